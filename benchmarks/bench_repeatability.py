"""Repeatability of latency measurements: p50 spread across 5 interleaved repeats.

Trains a small MLP on scikit-learn digits with PyTorch, exports it to ONNX, then
runs ``compressor run model.onnx -q dynamic -q fp16 --repeats 5`` once per
``--min-seconds`` value and reports the coefficient of variation of p50 latency
per variant, the spread within each run and the measurement overhead (wall time
of each measuring subprocess).

Usage: python benchmarks/bench_repeatability.py [--repeats 5] [--seconds 2 10]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from _common import compressor_cli, machine, markdown_table, write_section

#: The issue's repeatability floor: p50 CV across 5 repeats.
FLOOR = 0.05


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


def measure(model: Path, test: Path, folder: Path, repeats: int, seconds: float) -> list[tuple[str, ...]]:
    out = folder / f"out-{seconds:g}"
    compressor_cli("run", str(model), "-q", "dynamic", "-q", "fp16", "--data", str(test),
                   "--repeats", str(repeats), "--min-seconds", str(seconds), "--out", str(out))
    report = json.loads((out / "report.json").read_text())
    rows = []
    for variant in report["variants"]:
        metrics = variant["metrics"]
        latency = metrics["latency_ms"]
        rows.append((
            f"{seconds:g}",
            variant["name"],
            f"{latency['p50'] * 1000:.1f}",
            _cv(metrics["latency_p50_cv"]),
            ", ".join(f"{p50 * 1000:.1f}" for p50 in metrics["latency_p50_repeats"]),
            f"{100 * latency['p50_spread']:.1f}%",
            f"{latency['p50_fastest_window'] * 1000:.1f}",
            _cv(metrics["latency_fastest_window_cv"]),
            ", ".join(f"{p50 * 1000:.1f}" for p50 in metrics["latency_fastest_window_repeats"]),
            f"{metrics['measure_seconds']:.1f}",
            f"{metrics['measure_seconds'] - 2 * seconds:.1f}",
            f"{latency['iterations']}",
            f"{100 * metrics.get('accuracy', float('nan')):.2f}%",
        ))
    return rows


def _cv(value: float) -> str:
    return f"**{100 * value:.1f}%**" if value <= FLOOR else f"{100 * value:.1f}% (over {100 * FLOOR:g}%)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, nargs="+", default=[2.0, 10.0],
                        help="--min-seconds values to compare")
    arguments = parser.parse_args()
    repeats = arguments.repeats
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        model, test = build_model(folder)
        rows = [row for seconds in arguments.seconds
                for row in measure(model, test, folder, repeats, seconds)]
    header = ("--min-seconds", "variant", "p50 µs (median)", f"p50 CV over {repeats} repeats",
              "p50 µs of each repeat", "p50 spread within a run", "fastest-window p50 µs",
              f"fastest-window CV over {repeats} repeats", "fastest-window p50 µs of each repeat",
              "measure s / variant", "overhead s / variant", "timed calls", "accuracy")
    table = markdown_table(header, rows)
    print(table)
    write_section(
        "repeatability",
        "## Measurement repeatability\n\n`benchmarks/bench_repeatability.py`: an MLP (64-256-256-10) "
        "trained on scikit-learn digits, exported to ONNX, run as "
        f"`compressor run digits.onnx -q dynamic -q fp16 --repeats {repeats} --min-seconds S`: "
        "each repeat is a fresh subprocess per variant, variants interleaved, 1 thread pinned to one "
        "CPU, no address-space randomization, fixed hash seed, warmup 5, at least 30 calls and S "
        "seconds, for batch 1 and again for batch 32. The CV is the coefficient of variation of p50 "
        f"across the repeats (floor: {100 * FLOOR:g}%); 'spread within a run' is `p50_spread`, the CV "
        "of the p50s of consecutive 0.1 s windows of one run's timed calls, and 'fastest-window p50' "
        "is `p50_fastest_window`, the lowest of those p50s (medians over the repeats); 'measure s' is the median "
        "wall time of one measuring subprocess (interpreter start, imports, load, evaluation and "
        "both timings); 'overhead s' is that minus the two S-second timings: what measuring costs "
        "beyond the timing you asked for.\n\n"
        + table + "\n\n" + machine(("torch", "onnxruntime")),
    )


if __name__ == "__main__":
    main()
