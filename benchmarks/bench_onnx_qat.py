"""``qat`` (quantization-aware training) against post-training ``quantize int8`` on the onnx
backend, through the compressor CLI.

* ``mlp``: a 64-256-256-10 torch MLP trained 40 epochs on 75% of scikit-learn's digits;
* ``cnn``: a small torch CNN (two 3x3 Conv2d, 16 and 32 filters, then a Linear head) on the same
  split, trained 15 epochs.

Each: the fp32 original, ``quantize int8`` (ONNX Runtime static QDQ, per-channel, 256 training
images calibrate), ``qat`` with the defaults (2 epochs, AdamW 1e-4) and with 5 epochs, and for the
MLP ``prune 0.75`` one-shot (``epochs=0``) followed by either, and ``prune 0.75 epochs=5`` (fine-tuned)
then ``quantize int8``. Accuracy on the held-out 25%, size, batch-1 p50
latency. Run: ``flock /tmp/bench.lock python benchmarks/bench_onnx_qat.py [--only mlp,cnn]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import compressor_cli, machine, markdown_table, train_classifier, write_section  # noqa: E402
from bench_techniques import cpu_line  # noqa: E402

MEASURE = ("--threads", "1", "--repeats", "3")
#: Training single-threaded, as measuring is: the VM has 2 shared cores.
ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
CALIBRATION = 256
VARIANTS = {
    "quantize int8": ["quantize int8"],
    "qat": ["qat"],
    "qat epochs=5": ["qat epochs=5"],
}
PRUNED = {
    "prune 0.75 epochs=0, quantize int8": ["prune 0.75 epochs=0", "quantize int8"],
    "prune 0.75 epochs=5, quantize int8": ["prune 0.75 epochs=5", "quantize int8"],
    "prune 0.75 epochs=0, qat epochs=5": ["prune 0.75 epochs=0", "qat epochs=5"],
}


def mlp() -> Any:
    import torch

    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                               torch.nn.ReLU(), torch.nn.Linear(256, 10))


def cnn() -> Any:
    import torch

    return torch.nn.Sequential(torch.nn.Unflatten(1, (1, 8, 8)), torch.nn.Conv2d(1, 16, 3, padding=1),
                               torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32 * 16, 10))


def recipe(variants: dict[str, list[str]]) -> str:
    return "".join(f"[variants.{_slug(name)}]\nsteps = {json.dumps(steps)}\n" for name, steps in variants.items())


def _slug(name: str) -> str:
    return name.replace(" ", "-").replace(",", "").replace("=", "").replace(".", "")


def case(name: str, factory: str, epochs: int, variants: dict[str, list[str]], work: Path) -> str:
    import torch

    from compressor_onnx.samples import digits_split

    split = digits_split()
    torch.manual_seed(0)
    model = train_classifier(globals()[factory](), torch.from_numpy(split.train_x), torch.from_numpy(split.train_y),
                             epochs=epochs)
    weights = work / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    np.savez(work / "eval.npz", x=split.test_x, y=split.test_y)
    np.savez(work / "train.npz", x=split.train_x, y=split.train_y)
    np.savez(work / "calibration.npz", x=split.train_x[:CALIBRATION])
    steps = work / f"{name}.toml"
    steps.write_text(recipe(variants))
    out = work / f"{name}-out"
    started = time.perf_counter()
    compressor_cli("run", str(weights), "--recipe", str(steps), "-o", str(out), *MEASURE,
                   "--set", f"model_factory=bench_onnx_qat:{factory}", "--data", str(work / "eval.npz"),
                   "--train-data", str(work / "train.npz"), "--calibration-data", str(work / "calibration.npz"),
                   env=ENV)
    print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    report = {variant["name"]: variant for variant in json.loads((out / "report.json").read_text())["variants"]}
    base = report["original"]["metrics"]
    rows = []
    for label, variant in [("original (fp32)", report["original"]),
                           *((label, report[_slug(label)]) for label in variants)]:
        if variant.get("error"):
            rows.append([label, "failed: " + variant["error"], "", "", "", ""])
            continue
        metrics = variant["metrics"]
        rows.append([label, f"{metrics['size_bytes'] / 1e3:.1f}", f"{base['size_bytes'] / metrics['size_bytes']:.2f}x",
                     f"{metrics['accuracy'] * 100:.2f}", f"{(metrics['accuracy'] - base['accuracy']) * 100:+.2f}",
                     f"{metrics['latency_ms']['p50'] * 1000:.1f}"])
    header = ["variant", "KB", "smaller", "accuracy %", "vs fp32 pt", "p50 us (b1)"]
    parameters = sum(parameter.numel() for parameter in model.parameters())
    return (f"### digits {name.upper()} ({parameters:,} parameters, trained {epochs} epochs in fp32)\n\n"
            f"{len(split.train_y)} training images, {len(split.test_y)} held out.\n\n"
            f"{markdown_table(header, rows)}\n")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="mlp,cnn")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    chosen = set(args.only.split(","))
    sections = []
    with tempfile.TemporaryDirectory(prefix="bench-onnx-qat-") as scratch:
        work = Path(scratch)
        if "mlp" in chosen:
            sections.append(case("mlp", "mlp", 40, {**VARIANTS, **PRUNED}, work))
        if "cnn" in chosen:
            sections.append(case("cnn", "cnn", 15, VARIANTS, work))
    markdown = (
        "## `qat` vs post-training int8, onnx backend (`benchmarks/bench_onnx_qat.py`)\n\n"
        "Every variant through `compressor run` (fresh measuring subprocesses, 1 thread, 3 interleaved repeats, "
        f"medians; training with OMP_NUM_THREADS=1, seed 0). `quantize int8`: ONNX Runtime static QDQ, "
        f"per-channel weights, {CALIBRATION} training images calibrate; `qat`: fake-quantized training on the "
        f"training split with its labels (AdamW 1e-4, batch 32), exported as QDQ int8. CPU: {cpu_line()}.\n\n"
        + "\n".join(sections) + "\n" + machine(("torch", "onnx", "onnxruntime")) + "\n"
    )
    print(markdown)
    if not args.no_write:
        write_section("onnx-qat", markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
