"""Realistic reports built by hand for the report, chart and compare tests."""

from __future__ import annotations

from typing import Any

from compressor.report import Report, VariantResult

ENVIRONMENT = {
    "python": "3.11.9",
    "platform": "Linux-6.8.0-x86_64-with-glibc2.39",
    "cpu": {"model": "AMD EPYC 7B13", "cores": 2, "flags": ["avx2", "fma", "f16c"]},
    "versions": {"compressor": "0.1.0", "numpy": "2.1.3"},
}
SETTINGS = {
    "threads": 1, "warmup": 5, "min_iterations": 30, "min_seconds": 0.5, "batch_size": 32,
    "max_examples": None, "options": {}, "repeats": 1,
}


def metrics(size: int, p50: float, ram: int, accuracy: float | None = None, **extra: Any) -> dict[str, Any]:
    found: dict[str, Any] = {
        "size_bytes": size,
        "size_gzip_bytes": int(size * 0.9),
        "load_ms": 12.5,
        "latency_ms": {"p50": p50, "p90": p50 * 1.2, "p99": p50 * 1.6, "mean": p50 * 1.05,
                       "iterations": 120, "throughput_per_s": 1000 / p50},
        "peak_rss_bytes": ram,
        "compress_seconds": 0.8,
    }
    if accuracy is not None:
        found["accuracy"] = accuracy
    return {**found, **extra}


def fidelity(agreement: float, changed: list[tuple[int, Any, Any, Any]], labels: list[Any],
             matrix: list[list[int]]) -> dict[str, Any]:
    return {
        "agreement": agreement,
        "changed_count": sum(sum(row) for row in matrix) - sum(matrix[i][i] for i in range(len(matrix))),
        "changed_examples": [
            {"index": index, "original": before, "compressed": after, "label": label}
            for index, before, after, label in changed
        ],
        "confusion": {"labels": labels, "matrix": matrix},
    }


def onnx_report() -> Report:
    """An image classifier: fp16 and dynamic are on the front, int8 fails the budget."""
    labels = [0, 1, 2]
    return Report(
        model="digits.onnx",
        backend="onnx",
        created="2026-11-22T07:00:00+00:00",
        variants=[
            VariantResult("original", [], "original.onnx",
                          metrics(400_000, 0.40, 180_000_000, 0.9611,
                                  **fidelity(1.0, [], labels, [[120, 0, 0], [0, 118, 0], [0, 0, 122]]))),
            VariantResult("fp16", ["quantize fp16"], "fp16.onnx",
                          metrics(200_000, 0.42, 170_000_000, 0.9611,
                                  **fidelity(1.0, [], labels, [[120, 0, 0], [0, 118, 0], [0, 0, 122]]))),
            VariantResult("dynamic", ["quantize dynamic"], "dynamic.onnx",
                          metrics(110_000, 0.30, 160_000_000, 0.9583,
                                  **fidelity(0.9944, [(17, 1, 2, 1), (250, 2, 0, 2)], labels,
                                             [[120, 0, 0], [0, 117, 1], [1, 0, 121]]))),
            VariantResult("int8", ["quantize int8"], "int8.onnx",
                          metrics(120_000, 0.35, 165_000_000, 0.9000,
                                  **fidelity(0.92, [(3, 0, 1, 0), (9, 2, 1, 2)], labels,
                                             [[110, 10, 0], [0, 118, 0], [0, 19, 103]])),
                          notes=["calibrated on 64 examples"],
                          budget_failures=["accuracy drop 6.11 pt exceeds --max-accuracy-drop 1"]),
        ],
        settings=dict(SETTINGS),
        environment={**ENVIRONMENT, "versions": {**ENVIRONMENT["versions"], "onnxruntime": "1.20.1"}},
        budgets={"max_accuracy_drop": 1.0, "min_agreement": None},
    )


def fasttext_report() -> Report:
    """A text classifier with string labels; pq is far smaller than the original."""
    labels = ["__label__admin", "__label__devel", "__label__libs"]
    return Report(
        model="debian.bin",
        backend="fasttext",
        created="2026-11-22T07:05:00+00:00",
        variants=[
            VariantResult("original", [], "original.bin",
                          metrics(9_500_000, 0.05, 120_000_000, 0.9500)),
            VariantResult("pq", ["pq"], "pq.ftz",
                          metrics(350_000, 0.06, 60_000_000, 0.9400,
                                  **fidelity(0.97, [(5, "__label__libs", "__label__devel", "__label__libs")],
                                             labels, [[30, 0, 0], [0, 40, 0], [0, 3, 27]])),
                          metadata={"cutoff": 100000}),
        ],
        settings={**SETTINGS, "threads": 2},
        environment={**ENVIRONMENT, "versions": {**ENVIRONMENT["versions"], "fasttext-numpy2": "0.10.4"}},
        budgets={"max_accuracy_drop": None, "min_agreement": None},
    )
