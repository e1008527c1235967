"""Peak memory of static int8 on all-MiniLM-L6-v2: compressor's ``-q int8`` (the transformer
path) against ONNX Runtime's ``quantize_static``, on the same model and data, in one run.

1. 200 test.txt and 128 train.txt sentences of debian-descriptions, tokenized with the
   model's tokenizer (padded to 128 tokens): evaluation and calibration data.
2. ``compressor run <MiniLM folder> -q int8 --calibration-data <128 sentences>`` (one run per
   calibration method asked for). The quantizer runs in a forked child
   (``compressor.children.run_in_fork``), and ``quant_pre_process`` in a child of that; the run
   goes through a launcher that records each forked child's kernel high-water mark
   (``VmHWM``) when its work returns, and the parent's RSS when it forks. A forked child's
   mark starts at the parent's RSS at the fork (it shares those pages), so it is the figure
   ``/usr/bin/time -v`` would show for it. The parent's own peak during the compress step is
   the report's ``compress_peak_rss_bytes``. "Peak" is the largest of the three.
3. ONNX Runtime's ``quantize_static`` with its defaults on the tool's fp32 export, the same
   128 sentences in batches of 8 (as the tool calibrates) and of 1, each in a fresh
   process: its ``VmHWM`` at the end.
4. Fidelity of every int8 model: cosine of attention-mask mean-pooled embeddings with fp32's
   and nearest-neighbour agreement on the 200 sentences (batch 1).

``--before FILE`` also measures a previous ``transformer_static.py`` in the same run, e.g.
``git show COMMIT:backends/onnx/transformer_static.py > /tmp/old.py``.
Run: ``/work/venv/bin/python benchmarks/bench_int8_memory.py [--methods minmax,percentile]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _quant_helpers as helpers  # noqa: E402
from _common import SHARED, machine, markdown_table, write_section  # noqa: E402
from bench_onnx_minilm import model_folder, sentences, tokenize  # noqa: E402

SENTENCES, CALIBRATION, BATCH = 200, 128, 8
DISTRIBUTIONS = ("torch", "onnx", "onnxruntime", "transformers")
FLOOR_BYTES = 1.2e9
MB = 1e6

#: ``python -c`` for the compressor CLI, recording every ``run_in_fork`` child's VmHWM.
LAUNCHER = """
import importlib.util, json, os, sys
import compressor.children as children

def status(key):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(key + ":"))

record, replacement = os.environ["BENCH_FORK_PEAKS"], os.environ.get("BENCH_TRANSFORMER_STATIC")
if replacement:
    import compressor_onnx
    spec = importlib.util.spec_from_file_location("compressor_onnx.transformer_static", replacement)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
forking = children.run_in_fork

def run_in_fork(function, *args, step, **kwargs):
    parent_rss = status("VmRSS")
    def measured(*inner, **named):
        try:
            return function(*inner, **named)
        finally:
            with open(record, "a") as out:
                out.write(json.dumps({"function": function.__name__, "peak": status("VmHWM"),
                                      "parent_rss": parent_rss}) + "\\n")
    return forking(measured, *args, step=step, **kwargs)

children.run_in_fork = run_in_fork
try:
    import compressor.plugin as public  # the same function, re-exported to plugins
    public.run_in_fork = run_in_fork
except ImportError:
    pass
from compressor.cli import main
sys.argv = ["compressor", *sys.argv[1:]]
main()
"""

#: ``python -c`` for ONNX Runtime's quantize_static with its defaults: MODEL CALIBRATION OUT BATCH.
ORT_STATIC = """
import json, logging, sys, time
import numpy as np
from onnxruntime.quantization import CalibrationDataReader, quantize_static

logging.disable(logging.WARNING)
data, batch = dict(np.load(sys.argv[2])), int(sys.argv[4])

class Reader(CalibrationDataReader):
    def __init__(self):
        count = len(next(iter(data.values())))
        self.batches = iter([{k: v[i:i + batch] for k, v in data.items()} for i in range(0, count, batch)])
    def get_next(self):
        return next(self.batches, None)

started = time.perf_counter()
quantize_static(sys.argv[1], sys.argv[3], Reader())
seconds = time.perf_counter() - started
with open("/proc/self/status") as lines:
    peak = next(int(line.split()[1]) * 1024 for line in lines if line.startswith("VmHWM:"))
print(json.dumps({"peak": peak, "seconds": seconds}))
"""


def compressor_int8(folder: Path, calibration: Path, work: Path, label: str, method: str,
                    module: Path | None) -> dict[str, Any]:
    """One ``compressor run -q int8``: peaks (parent, children), compress seconds, the artifacts."""
    out, peaks = work / f"out-{label}-{method}", work / f"forks-{label}-{method}.jsonl"
    environment = {**os.environ, "BENCH_FORK_PEAKS": str(peaks), "HF_HUB_OFFLINE": "1"}
    if module is not None:
        environment["BENCH_TRANSFORMER_STATIC"] = str(module)
    extra = [] if method == "minmax" else ["--set", f"calibration_method={method}"]
    command = [sys.executable, "-c", LAUNCHER, "run", str(folder), "-q", "int8", "--calibration-data",
               str(calibration), "-o", str(out), "--min-seconds", "0.2", "--quiet", *extra]
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        raise SystemExit(f"compressor run ({label}, {method}) failed ({result.returncode}):\n{result.stderr}")
    report = json.loads((out / "report.json").read_text())
    variant = next(v for v in report["variants"] if v["name"] != "original")
    forks = [json.loads(line) for line in peaks.read_text().splitlines()]
    quantizer = [fork for fork in forks if fork["function"] == "_quantize_int8_file"]
    pre = [fork for fork in forks if fork["function"] == "_pre_process_here"]
    if len(quantizer) != 1 or variant.get("error"):
        raise SystemExit(f"expected one quantizing child and an int8 artifact, got {forks} / {variant.get('error')}")
    facts = {
        "parent": variant["metrics"]["compress_peak_rss_bytes"],
        "parent_at_fork": quantizer[0]["parent_rss"],
        "quantizer": quantizer[0]["peak"],
        "pre_process": max((fork["peak"] for fork in pre), default=None),
        "seconds": variant["metrics"]["compress_seconds"],
        "artifact": out / variant["artifact"],
        "original": out / "original.onnx",
        "digest": _digest(out / variant["artifact"]),
    }
    facts["peak"] = max(value for key, value in facts.items()
                        if key in ("parent", "quantizer", "pre_process") and value is not None)
    return facts


def _digest(artifact: Path) -> str:
    """SHA-256 of the model file and its external data, if any."""
    import hashlib

    digest = hashlib.sha256()
    for path in (artifact, artifact.with_name(artifact.name + ".data")):
        if path.exists():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def onnx_runtime_static(original: Path, calibration: Path, work: Path, batch: int) -> dict[str, Any]:
    target = work / f"ort-quantize_static-b{batch}.onnx"
    result = subprocess.run([sys.executable, "-c", ORT_STATIC, str(original), str(calibration), str(target),
                             str(batch)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"quantize_static failed ({result.returncode}):\n{result.stderr}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "artifact": target}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="minmax", help="calibration methods, comma-separated")
    parser.add_argument("--before", type=Path, help="a previous transformer_static.py to measure too")
    parser.add_argument("--before-label", default="before", help="what to call it in the table")
    arguments = parser.parse_args()
    methods = [method.strip() for method in arguments.methods.split(",") if method.strip()]
    codes = [("after", None)] + ([(arguments.before_label, arguments.before.resolve())] if arguments.before else [])
    folder = model_folder()
    data = SHARED / "data" / "debian-descriptions"
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-int8-memory-") as scratch:
        work = Path(scratch)
        tokenize(folder, sentences(data / "test.txt", SENTENCES), work / "eval.npz")
        tokenize(folder, sentences(data / "train.txt", CALIBRATION), work / "calibration.npz")
        runs = {(label, method): compressor_int8(folder, work / "calibration.npz", work, label, method, module)
                for label, module in codes for method in methods}
        original = next(iter(runs.values()))["original"]
        ort = {batch: onnx_runtime_static(original, work / "calibration.npz", work, batch) for batch in (BATCH, 1)}
        load_after = os.getloadavg()[0]
        evaluation = dict(np.load(work / "eval.npz"))
        reference = helpers.sentence_embeddings(original, evaluation)
        artifacts = {**{key: run["artifact"] for key, run in runs.items()},
                     **{("ort", batch): run["artifact"] for batch, run in ort.items()}}
        fidelity = {key: helpers.fidelity(helpers.sentence_embeddings(path, evaluation), reference)
                    for key, path in artifacts.items()}
    before = codes[1][0] if len(codes) > 1 else None
    rows = []
    for (label, method), run in runs.items():
        pre = f"{run['pre_process'] / MB:.0f}" if run["pre_process"] else "-"
        same = "-" if before is None or label == before else (
            "yes" if run["digest"] == runs[(before, method)]["digest"] else "no")
        rows.append([f"compressor `-q int8` ({label})", method, same, f"{run['parent'] / MB:.0f}",
                     f"{run['parent_at_fork'] / MB:.0f}", f"{run['quantizer'] / MB:.0f}", pre,
                     f"**{run['peak'] / MB:.0f}**", *_ratios(run["peak"], ort), f"{run['seconds']:.1f}",
                     *_fidelity(fidelity[(label, method)])])
    for batch, run in ort.items():
        rows.append([f"ONNX Runtime `quantize_static` (defaults, batches of {batch})", "minmax", "-", "-", "-", "-", "-",
                     f"**{run['peak'] / MB:.0f}**", *_ratios(run["peak"], ort), f"{run['seconds']:.1f}",
                     *_fidelity(fidelity[("ort", batch)])])
    table = markdown_table(["static int8", "calibration", "same model bytes as before", "parent during compress MB",
                            "parent RSS at fork MB",
                            "quantizing child MB", "quant_pre_process child MB", "peak MB",
                            f"vs ONNX Runtime (batches of {BATCH})", "vs ONNX Runtime (batches of 1)",
                            "compress s", "cosine", "NN agreement"], rows)
    after = runs[("after", methods[0])]
    verdict = "pass" if after["peak"] <= FLOOR_BYTES else "FAIL"
    markdown = f"""## onnx: static int8 peak memory on all-MiniLM-L6-v2 (`benchmarks/bench_int8_memory.py`)

`compressor run <MiniLM folder> -q int8 --calibration-data <{CALIBRATION} train.txt sentences>` (one run
per row; the tool calibrates in batches of {BATCH}), against ONNX Runtime's `quantize_static` with its
defaults on the tool's fp32 export and the same sentences in a fresh process, in the same run. Peaks
are the kernel's high-water mark (`VmHWM`): the parent's during the compress step
(`compress_peak_rss_bytes`), and each forked child's when its work returns (the quantizer, and
`quant_pre_process` inside it). A forked child's mark starts at the parent's RSS at the fork (pages
it shares with the parent), as `/usr/bin/time -v` counts it. "Peak" is the largest of them; the
ratios are to ONNX Runtime's process. Fidelity: cosine of attention-mask mean-pooled embeddings
with fp32's and nearest-neighbour agreement on {SENTENCES} test.txt sentences (batch 1). Compress
seconds are wall time on a shared machine (load average {load_before:.1f} at the start,
{load_after:.1f} at the end, 2 cores).{_before_note(before)} ONNX Runtime's own peak grows with the
calibration batch: its calibrator runs each batch through a copy of the model with every tensor it
calibrates as an output.

{table}

Floor: `-q int8` ({methods[0]}) peak {after['peak'] / MB:.0f} MB (floor {FLOOR_BYTES / MB:.0f} MB: {verdict}), \
{after['peak'] / ort[BATCH]['peak']:.2f}x ONNX Runtime's `quantize_static` on the same batches.

{machine(DISTRIBUTIONS)}
"""
    print(markdown)
    write_section("int8-memory", markdown)


def _before_note(before: str | None) -> str:
    if before is None:
        return ""
    return (f" Rows \"{before}\" run the same launcher with that `transformer_static.py` loaded in place of "
            "today's (`--before`); \"same model bytes\" compares the int8 files (SHA-256) with them.")


def _ratios(peak: int, ort: dict[int, dict[str, Any]]) -> list[str]:
    return [f"{peak / ort[batch]['peak']:.2f}x" for batch in (BATCH, 1)]


def _fidelity(figures: tuple[float, float]) -> list[str]:
    return [f"{figures[0]:.4f}", f"{figures[1]:.3f}"]


if __name__ == "__main__":
    main()
