"""Repeatability of latency measurements: p50 spread across 5 interleaved repeats.

Trains a small MLP on scikit-learn digits with PyTorch, exports it to ONNX, then
runs ``compressor run model.onnx -q dynamic -q fp16 --repeats 5`` and reports the
coefficient of variation of p50 latency per variant and the measurement
overhead (wall time of each measuring subprocess).

Usage: python benchmarks/bench_repeatability.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from _common import compressor_cli, machine, markdown_table, write_section


def build_model(folder: Path) -> tuple[Path, Path]:
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    features, labels = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(60):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(features), labels).backward()
        optimizer.step()
    model.eval()
    path = folder / "digits.onnx"
    torch.onnx.export(model, (features[:1],), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    test = folder / "test.npz"
    np.savez(test, x=x_test, y=y_test)
    return path, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    arguments = parser.parse_args()
    repeats, min_seconds = arguments.repeats, arguments.min_seconds
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        model, test = build_model(folder)
        out = folder / "out"
        compressor_cli("run", str(model), "-q", "dynamic", "-q", "fp16", "--data", str(test),
                       "--repeats", str(repeats), "--min-seconds", str(min_seconds), "--out", str(out))
        report = json.loads((out / "report.json").read_text())
    rows = []
    for variant in report["variants"]:
        metrics = variant["metrics"]
        rows.append((
            variant["name"],
            f"{metrics['latency_ms']['p50'] * 1000:.1f}",
            f"{100 * metrics['latency_p50_cv']:.2f}%",
            f"{metrics['measure_seconds']:.2f}",
            f"{metrics['latency_ms']['iterations']}",
            f"{100 * metrics.get('accuracy', float('nan')):.2f}%",
            ", ".join(f"{p50 * 1000:.1f}" for p50 in metrics["latency_p50_repeats"]),
        ))
    header = ("variant", "p50 µs (median)", f"p50 CV over {repeats} repeats", "measure s / variant",
              "timed calls", "accuracy", "p50 µs of each repeat")
    table = markdown_table(header, rows)
    print(table)
    write_section(
        "repeatability",
        "## Measurement repeatability\n\n`benchmarks/bench_repeatability.py`: an MLP (64-256-256-10) "
        "trained on scikit-learn digits, exported to ONNX, measured with "
        f"`--repeats {repeats} --min-seconds {min_seconds:g}` (each repeat a fresh subprocess per "
        "variant, variants interleaved, 1 thread pinned to one CPU, no address-space randomization, "
        f"fixed hash seed, warmup 5, at least 30 calls and {min_seconds:g} s). The CV is the coefficient of variation "
        "of p50 across repeats; 'measure s' is the median wall time of one measuring subprocess "
        "(interpreter start, imports, load, evaluation and timing): the overhead per variant.\n\n"
        + table + "\n\n" + machine(("torch", "onnxruntime")),
    )


if __name__ == "__main__":
    main()
