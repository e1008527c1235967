"""The fidelity budgets (``--max-accuracy-drop``, ``--min-agreement``, ``--min-cosine``):
which a variant breaks and by how much.

``run`` marks the variants outside them (:func:`apply_budgets`); ``search`` also needs
how far outside a trial is (:func:`violation`), to rule out stricter configurations and
to stop a trial early (:func:`compressor.search_limits.certain_violation`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from compressor.results import ReportData
from compressor.run_request import RunRequest

#: ``{"max_accuracy_drop": pt, "min_agreement": share, "min_cosine": c}``, None where not set.
Budgets = Mapping[str, float | None]
BUDGET_KEYS = ("max_accuracy_drop", "min_agreement", "min_cosine")
#: The figures a budget reads; a variant with none of them cannot be judged.
FIDELITY_KEYS = ("accuracy", "agreement", "cosine")


def budgets_of(request: RunRequest) -> dict[str, float | None]:
    return {"max_accuracy_drop": request.max_accuracy_drop, "min_agreement": request.min_agreement,
            "min_cosine": request.min_cosine}


def violation(metrics: Mapping[str, Any], base: Mapping[str, Any], budgets: Budgets) -> float:
    """How far outside the budget (0 or less: inside), as a share (1 pt of accuracy = 0.01)."""
    worst = 0.0
    accuracy, base_accuracy = metrics.get("accuracy"), base.get("accuracy")
    drop_limit = budgets.get("max_accuracy_drop")
    if drop_limit is not None and accuracy is not None and base_accuracy is not None:
        worst = max(worst, (base_accuracy - accuracy) - drop_limit / 100)
    agreement_limit = budgets.get("min_agreement")
    if agreement_limit is not None and metrics.get("agreement") is not None:
        worst = max(worst, agreement_limit - metrics["agreement"])
    cosine = (metrics.get("cosine") or {}).get("mean")
    cosine_limit = budgets.get("min_cosine")
    if cosine_limit is not None and cosine is not None:
        worst = max(worst, cosine_limit - cosine)
    if _budgeted(budgets) and not any(key in metrics for key in FIDELITY_KEYS):
        worst = max(worst, 1.0)
    return worst


def budget_failures(metrics: Mapping[str, Any], base: Mapping[str, Any], budgets: Budgets) -> list[str]:
    """Why a variant's ``metrics`` break the budgets, against the original's ``base``."""
    failures = []
    drop_limit, agreement_limit = budgets.get("max_accuracy_drop"), budgets.get("min_agreement")
    cosine_limit = budgets.get("min_cosine")
    base_accuracy = base.get("accuracy")
    if drop_limit is not None and base_accuracy is not None and metrics.get("accuracy") is not None:
        drop = (base_accuracy - metrics["accuracy"]) * 100
        if drop > drop_limit:
            failures.append(f"accuracy drop {drop:.2f} pt exceeds --max-accuracy-drop {drop_limit:g}")
    agreement = metrics.get("agreement")
    if agreement_limit is not None and agreement is not None and agreement < agreement_limit:
        failures.append(f"agreement {agreement:.4f} below --min-agreement {agreement_limit:g}")
    cosine = (metrics.get("cosine") or {}).get("mean")
    if cosine_limit is not None and cosine is not None and cosine < cosine_limit:
        failures.append(f"cosine {cosine:.4f} below --min-cosine {cosine_limit:g}")
    budgeted = _budgeted(budgets)
    if budgeted and not any(key in metrics for key in FIDELITY_KEYS):
        failures.append("budget set but no accuracy/agreement measured (pass --data)")
    if budgeted:
        failures.extend(unfit_outputs(metrics))
    return failures


def _budgeted(budgets: Budgets) -> bool:
    return any(budgets.get(key) is not None for key in BUDGET_KEYS)


def unfit_outputs(metrics: Mapping[str, Any]) -> list[str]:
    """A variant whose outputs hold NaN or Inf where the original's do not, or whose outputs
    could not be compared, cannot pass a fidelity budget whatever its other figures."""
    failures = []
    for name, counts in (metrics.get("nonfinite") or {}).items():
        if isinstance(counts, dict) and counts.get("new_examples"):
            failures.append(f"output {name} holds NaN or Inf for {counts['new_examples']} examples where the "
                            "original's does not")
    for name, entry in (metrics.get("outputs") or {}).items():
        if isinstance(entry, dict) and entry.get("error"):
            failures.append(f"output {name} could not be compared: {entry['error']}")
    return failures


def apply_budgets(report: ReportData) -> None:
    base = report.variants[0].metrics if report.variants else {}
    for variant in report.variants[1:]:
        # Only what was measured is judged (a search's skipped trials were not).
        if variant.error is None and "latency_ms" in variant.metrics:
            variant.budget_failures = budget_failures(variant.metrics, base, report.budgets)
