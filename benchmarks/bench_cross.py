"""One model, two runtimes: a PyTorch digits MLP and a Keras digits CNN, each run with
``compressor run --backend onnx,tflite`` (``tflite,onnx`` for the Keras model) so that
every variant is compared with one original.

* ``mlp``: a 64-256-256-10 torch MLP trained here on 75% of scikit-learn's digits, a
  state_dict (``--set model_factory=bench_cross:digits_mlp``): ONNX Runtime through the
  torch exporter, LiteRT through litert-torch and ai-edge-quantizer.
* ``cnn``: the Keras digits CNN of ``bench_tflite.py``: LiteRT through the TFLite converter,
  ONNX Runtime through tf2onnx.

Each backend's variants are measured in one ``compressor run`` (fresh measuring
subprocesses, 1 thread, 3 interleaved repeats, medians), so a variant's speed is a ratio
to its own runtime's fp32 original measured in the same rounds. Agreement and accuracy
are against the merged report's one reference (the first backend's original).
Run: ``flock /tmp/bench.lock python benchmarks/bench_cross.py [--only mlp,cnn]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import compressor_cli, machine, markdown_table, train_classifier, write_section  # noqa: E402

FACTORY = "bench_cross:digits_mlp"
HIDDEN = 256
MEASURE = ("--threads", "1", "--repeats", "3")
VARIANTS = ("-q", "fp16", "-q", "dynamic", "-q", "int8")
HEADER = ["backend:variant", "converter / quantizer", "KB", "p50 us (b1)", "vs own fp32 (b1 p50)",
          "accuracy %", "agreement vs reference", "cosine min vs reference"]


def digits_mlp() -> Any:
    """The benchmark's torch MLP, untrained: 64 pixels -> 256 -> 256 -> 10 classes."""
    import torch

    return torch.nn.Sequential(torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
                               torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10))


def run_both(model: Path, backends: str, work: Path, *args: str, env: dict[str, str] | None = None
             ) -> dict[str, Any]:
    out = work / f"{model.stem}-out"
    compressor_cli("run", str(model), "--backend", backends, *VARIANTS, "-o", str(out), *MEASURE, *args, env=env)
    return json.loads((out / "report.json").read_text())


def rows_of(report: dict[str, Any], paths: dict[str, str]) -> list[list[str]]:
    """One row per variant; ``paths`` names how each backend got its graph (shown where the
    report's metadata does not say)."""
    variants = {variant["name"]: variant for variant in report["variants"]}
    rows = []
    for name, variant in variants.items():
        if variant.get("error"):
            rows.append([name, "failed: " + variant["error"]] + [""] * (len(HEADER) - 2))
            continue
        metrics, metadata = variant["metrics"], variant.get("metadata", {})
        backend = name.split(":")[0]
        own = variants[f"{backend}:original"]["metrics"]["latency_ms"]["p50"]
        p50 = metrics["latency_ms"]["p50"]
        how = metadata.get("recipe") or metadata.get("converter") or paths[backend]
        rows.append([
            name, how, f"{metrics['size_bytes'] / 1e3:.1f}", f"{p50 * 1000:.1f}", f"{own / p50:.2f}x",
            f"{metrics['accuracy'] * 100:.2f}", f"{metrics.get('agreement', 1.0):.4f}",
            f"{metrics.get('cosine', {}).get('min', 1.0):.4f}",
        ])
    return rows


def slower(report: dict[str, Any]) -> str:
    """The variants slower at batch 1 than their own runtime's fp32 original."""
    variants = {variant["name"]: variant for variant in report["variants"] if not variant.get("error")}
    found = []
    for name, variant in variants.items():
        own = variants.get(f"{name.split(':')[0]}:original")
        if own is not None:
            ratio = own["metrics"]["latency_ms"]["p50"] / variant["metrics"]["latency_ms"]["p50"]
            found += [f"`{name}` {ratio:.2f}x"] if ratio < 0.95 else []
    return "Slower than their own fp32 at batch 1: " + (", ".join(found) or "none") + "."


def floor(report: dict[str, Any]) -> tuple[str, bool]:
    """Every conversion's float original agrees >= 99.5% with the reference."""
    originals = [v for v in report["variants"] if v["name"].endswith(":original")]
    held = all(not v.get("error") and v["metrics"].get("agreement", 1.0) >= 0.995 for v in originals)
    shown = ", ".join(f"`{v['name']}` {v['metrics'].get('agreement', 0):.4f}" for v in originals)
    return f"float originals agree with the reference: {shown} ({'pass' if held else 'FAIL'})", held


def mlp_case(work: Path) -> tuple[str, bool]:
    import torch

    from compressor_onnx.samples import digits_split

    split = digits_split()
    torch.manual_seed(0)
    module = train_classifier(digits_mlp(), torch.from_numpy(split.train_x), torch.from_numpy(split.train_y))
    torch.save(module.state_dict(), work / "mlp.pt")
    np.savez(work / "mlp-eval.npz", x=split.test_x, y=split.test_y)
    np.savez(work / "mlp-calib.npz", x=split.train_x[:200])
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    report = run_both(work / "mlp.pt", "onnx,tflite", work, "--set", f"model_factory={FACTORY}",
                      "--data", str(work / "mlp-eval.npz"), "--calibration-data", str(work / "mlp-calib.npz"),
                      env=env)
    text, held = floor(report)
    return f"""### digits MLP written in PyTorch: `--backend onnx,tflite`

A 64-{HIDDEN}-{HIDDEN}-10 torch MLP trained 40 epochs on 75% of scikit-learn's digits, loaded as a
state_dict; {len(split.test_y)} held-out images; 200 training images calibrate int8. Reference:
`{report['settings']['reference']}` (the torch exporter's graph of the module). LiteRT's flatbuffer
from litert-torch has a static batch of 1, so only batch-1 latency is measured for `tflite:*`.

{markdown_table(HEADER, rows_of(report, {"onnx": "torch.onnx.export, ORT quantizer"}))}

{slower(report)} Floor: {text}.
""", held


def cnn_case(work: Path) -> tuple[str, bool]:
    from bench_tflite import trained_digits_cnn

    model, train_x, train_y, test_x, test_y = trained_digits_cnn()
    model.save(work / "cnn.keras")
    np.savez(work / "cnn-eval.npz", image=test_x, y=test_y)
    np.savez(work / "cnn-calib.npz", image=train_x[:200])
    report = run_both(work / "cnn.keras", "tflite,onnx", work, "--data", str(work / "cnn-eval.npz"),
                      "--calibration-data", str(work / "cnn-calib.npz"))
    text, held = floor(report)
    return f"""### digits CNN written in Keras: `--backend tflite,onnx`

The Keras CNN of `bench_tflite.py` (Conv2D 32, Conv2D 64, max-pool, Dense 128, dropout, Dense 10)
trained 30 epochs on 70% of the digits; {len(test_y)} held-out images; 200 training images calibrate
int8. Reference: `{report['settings']['reference']}` (the TFLite converter's fp32 flatbuffer);
`onnx:*` start from tf2onnx's graph.

{markdown_table(HEADER, rows_of(report, {"tflite": "TFLite converter", "onnx": "tf2onnx, ORT quantizer"}))}

{slower(report)} Floor: {text}.
""", held


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="mlp,cnn")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    chosen = set(args.only.split(","))
    sections, failures = [], []
    with tempfile.TemporaryDirectory(prefix="bench-cross-") as scratch:
        work = Path(scratch)
        for name, case in (("mlp", mlp_case), ("cnn", cnn_case)):
            if name in chosen:
                text, held = case(work)
                sections.append(text)
                failures += [] if held else [name]
    markdown = (
        "## Across frameworks: PyTorch on LiteRT, Keras on ONNX Runtime (`benchmarks/bench_cross.py`)\n\n"
        "Each model through `compressor run MODEL --backend onnx,tflite` (one comparison, one reference), "
        "1 thread, 3 interleaved repeats per backend, medians. `vs own fp32`: the variant's batch-1 p50 "
        "against its own runtime's fp32 original, measured in the same rounds.\n\n" + "\n".join(sections) + "\n"
        + machine(("torch", "onnx", "onnxruntime", "tensorflow-cpu", "tf-keras", "ai-edge-litert", "litert-torch",
                   "ai-edge-quantizer", "tf2onnx")) + "\n"
    )
    print(markdown)
    if not args.no_write:
        write_section("cross", markdown)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
