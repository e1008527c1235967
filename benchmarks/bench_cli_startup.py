"""How fast does the CLI answer? ``compressor --help`` / ``backends`` with every extra installed.

Usage: python benchmarks/bench_cli_startup.py [--runs 20]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

from _common import machine, markdown_table, write_section

COMMANDS = {
    "python -c 'import compressor'": [sys.executable, "-c", "import compressor"],
    "compressor --help": [sys.executable, "-m", "compressor", "--help"],
    "compressor backends": [sys.executable, "-m", "compressor", "backends"],
    "python -c pass (interpreter alone)": [sys.executable, "-c", "pass"],
}


def time_command(command: list[str], runs: int) -> list[float]:
    samples = []
    subprocess.run(command, capture_output=True, check=True)  # warm the file cache
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    runs = parser.parse_args().runs
    rows = []
    for label, command in COMMANDS.items():
        samples = time_command(command, runs)
        rows.append((label, f"{statistics.median(samples):.0f}", f"{max(samples):.0f}"))
        print(f"{label:40s} median {statistics.median(samples):6.0f} ms  max {max(samples):6.0f} ms")
    script = shutil.which("compressor")
    if script:
        samples = time_command([script, "--help"], runs)
        rows.append(("compressor --help (console script)", f"{statistics.median(samples):.0f}",
                     f"{max(samples):.0f}"))
    write_section(
        "cli-startup",
        "## CLI start-up\n\n`benchmarks/bench_cli_startup.py`, "
        f"{runs} runs each, every extra (torch, TensorFlow, ONNX Runtime, fastText) installed. "
        "Frameworks are imported only inside plugin functions, so start-up stays close to the "
        "bare interpreter.\n\n"
        + markdown_table(("command", "median ms", "max ms"), rows)
        + "\n\n"
        + machine(("torch", "tensorflow-cpu", "onnxruntime", "fasttext-numpy2")),
    )


if __name__ == "__main__":
    main()
