"""The warnings a report gives about a variant that is worse than it looks."""

from __future__ import annotations

from typing import Any

from compressor.cautions import apply_cautions
from compressor.report import Report, VariantResult


def latency(p50: float, p90: float | None = None) -> dict[str, Any]:
    return {"latency_ms": {"p50": p50, "p90": p90 if p90 is not None else p50 * 1.05}}


def report_of(*variants: VariantResult, flags: tuple[str, ...] = ()) -> Report:
    environment = {"cpu": {"model": "Test CPU", "flags": list(flags)}} if flags else {}
    report = Report("m.onnx", "onnx", "2026-12-01", list(variants), environment=environment)
    apply_cautions(report)
    return report


def original(**metrics: Any) -> VariantResult:
    return VariantResult("original", [], metrics={**latency(2.0), "size_bytes": 1000,
                                                  "size_gzip_bytes": 900, **metrics})


def test_a_clearly_slower_variant_is_flagged_and_never_best() -> None:
    slow = VariantResult("slow", ["quantize int8"], metrics={**latency(3.0), "size_bytes": 300,
                                                            "size_gzip_bytes": 250, "agreement": 1.0})
    report = report_of(original(agreement=1.0), slow)
    assert slow.warnings == ["slower than the original: p50 3 ms vs 2 ms (+50%)"]
    assert report.best("size").name == "original"


def test_timing_noise_on_a_tiny_model_is_not_flagged() -> None:
    # +60% but 12 microseconds: which of two such runs wins is scheduling noise.
    tiny_original = VariantResult("original", [], metrics={**latency(0.02, 0.04), "size_bytes": 1000,
                                                           "size_gzip_bytes": 900, "agreement": 1.0})
    tiny = VariantResult("int8", ["quantize int8"], metrics={**latency(0.032), "size_bytes": 300,
                                                            "size_gzip_bytes": 250})
    report = report_of(tiny_original, tiny)
    assert tiny.warnings == []
    assert report.best("size").name == "int8"


def test_slower_within_the_originals_spread_is_not_flagged() -> None:
    spread = VariantResult("original", [], metrics={**latency(2.0, 3.0), "size_bytes": 1000,
                                                    "size_gzip_bytes": 900})
    variant = VariantResult("v", ["quantize fp16"], metrics={**latency(2.5), "size_bytes": 500,
                                                            "size_gzip_bytes": 450})
    report_of(spread, variant)
    assert variant.warnings == []


def test_disagreeing_and_uncompressed_variants_are_flagged() -> None:
    disagreeing = VariantResult("d", ["quantize int8"], metrics={**latency(2.0), "size_bytes": 300,
                                                                "size_gzip_bytes": 250, "agreement": 0.5})
    same = VariantResult("s", ["prune 0.1"], metrics={**latency(2.0), "size_bytes": 990, "size_gzip_bytes": 880})
    report_of(original(agreement=1.0), disagreeing, same)
    assert disagreeing.warnings == ["agrees with the original on only 50.0% (top-1)"]
    assert same.warnings == ["nothing was compressed: 0.99x the original's size (gzip 0.98x)"]


def test_no_evaluation_data_and_no_vnni_are_said_once() -> None:
    int8 = VariantResult("int8", ["quantize dynamic"], metrics={**latency(1.0), "size_bytes": 300,
                                                               "size_gzip_bytes": 250})
    base = original()
    report_of(base, int8, flags=("avx2", "fma"))
    assert base.warnings == ["no evaluation data: how faithful the variants are was not measured (pass --data)"]
    assert len(base.notes) == 1 and "Test CPU" in base.notes[0] and "VNNI" in base.notes[0]
    with_vnni = original(agreement=1.0)
    report_of(with_vnni, int8, flags=("avx2", "avx512_vnni"))
    assert with_vnni.warnings == [] and with_vnni.notes == []


def side_by_side(ratio: float, low: float, high: float) -> dict[str, Any]:
    return {"latency_ratio": ratio, "latency_ratio_low": low, "latency_ratio_high": high}


def test_a_side_by_side_interval_decides_over_separate_p50s() -> None:
    """Separate processes on a busy machine said +50%; timed side by side it is within noise."""
    drifted = VariantResult("fp16", ["quantize fp16"], metrics={**latency(3.0), **side_by_side(1.02, 0.98, 1.06),
                                                               "size_bytes": 500, "size_gzip_bytes": 450})
    slower = VariantResult("int8", ["quantize int8"], metrics={**latency(2.1), **side_by_side(1.35, 1.3, 1.4),
                                                              "size_bytes": 300, "size_gzip_bytes": 250})
    report_of(original(), drifted, slower)
    assert drifted.warnings == []
    assert slower.warnings == ["slower than the original: 1.35x its latency side by side (95% interval 1.30-1.40x)"]
