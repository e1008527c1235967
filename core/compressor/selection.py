"""Choosing among a report's variants: the best one for an objective within a budget,
and the report as a table (``Report.best``, ``Report.to_pandas``)."""

from __future__ import annotations

from typing import Any

from compressor.errors import UnsupportedError, UsageError
from compressor.results import ReportData, VariantResult

#: Objective name -> how to read it from a variant's metrics (smaller is better).
OBJECTIVES = ("size", "latency", "peak_ram")


def objective_value(variant: VariantResult, objective: str) -> float | None:
    metrics = variant.metrics
    if objective == "size":
        value = metrics.get("size_bytes")
    elif objective == "latency":
        value = (metrics.get("latency_ms") or {}).get("p50")
    elif objective == "peak_ram":
        value = metrics.get("peak_rss_bytes")
    else:
        raise UsageError(f"objective {objective!r} is not one of: {', '.join(OBJECTIVES)}")
    return float(value) if isinstance(value, (int, float)) else None


def best(report: ReportData, objective: str = "size", *, min_agreement: float | None = None,
         max_accuracy_drop: float | None = None, min_cosine: float | None = None,
         include_original: bool = True) -> VariantResult | None:
    """The variant with the smallest ``objective`` among those that were measured,
    stay within every given bound, are inside the run's budgets and carry no
    warning; None when no variant qualifies."""
    if objective not in OBJECTIVES:
        raise UsageError(f"objective {objective!r} is not one of: {', '.join(OBJECTIVES)}")
    base_accuracy = report.variants[0].metrics.get("accuracy") if report.variants else None
    candidates = []
    for index, variant in enumerate(report.variants):
        if (index == 0 and not include_original) or variant.error or variant.budget_failures or variant.warnings:
            continue
        metrics = variant.metrics
        if min_agreement is not None and not _at_least(metrics.get("agreement"), min_agreement):
            continue
        if min_cosine is not None and not _at_least((metrics.get("cosine") or {}).get("mean"), min_cosine):
            continue
        if max_accuracy_drop is not None:
            accuracy = metrics.get("accuracy")
            if base_accuracy is None or accuracy is None or (base_accuracy - accuracy) * 100 > max_accuracy_drop:
                continue
        value = objective_value(variant, objective)
        if value is not None:
            candidates.append((value, index, variant))
    return min(candidates, key=lambda item: (item[0], item[1]))[2] if candidates else None


def _at_least(value: Any, bound: float) -> bool:
    return isinstance(value, (int, float)) and value >= bound


def to_rows(report: ReportData) -> list[dict[str, Any]]:
    """One flat dict per variant: the columns of the terminal table, as numbers."""
    base = report.variants[0].metrics.get("size_bytes") if report.variants else None
    rows = []
    for variant in report.variants:
        metrics = variant.metrics
        latency = metrics.get("latency_ms") or {}
        size = metrics.get("size_bytes")
        rows.append({
            "variant": variant.name,
            "steps": " > ".join(variant.steps),
            "size_bytes": size,
            "smaller": base / size if base and size else None,
            "latency_p50_ms": latency.get("p50"),
            "latency_p99_ms": latency.get("p99"),
            "peak_rss_bytes": metrics.get("peak_rss_bytes"),
            "accuracy": metrics.get("accuracy"),
            "agreement": metrics.get("agreement"),
            "agreement_output": metrics.get("agreement_output"),
            "agreement_kind": metrics.get("agreement_kind"),
            "cosine": (metrics.get("cosine") or {}).get("mean"),
            "task": metrics.get("task"),
            "nonfinite_examples": sum(counts.get("examples", 0) for counts in (metrics.get("nonfinite") or {}).values()
                                      if isinstance(counts, dict)) or None,
            "warnings": "; ".join(variant.warnings),
            "budget_failures": "; ".join(variant.budget_failures),
            "error": variant.error,
            "artifact": str(variant.artifact_path) if variant.artifact_path else variant.artifact,
        })
    return rows


def to_pandas(report: ReportData) -> Any:
    try:
        import pandas
    except ModuleNotFoundError:
        raise UnsupportedError("Report.to_pandas needs pandas: pip install pandas") from None
    return pandas.DataFrame(to_rows(report)).set_index("variant")
