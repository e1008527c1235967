"""Each output's headline figure as text, and the legend under a report's table.

The table's ``agreement`` column shows, per compared output, the figure its task's
users read (see :mod:`compressor.comparing`): ``99.70%`` top-1, ``px 99.70%`` per
pixel, ``F1 97.20%`` multi-label, ``det F1 95.00%`` detections, ``exact 81.00%``
decoded strings, ``nn 98.00% cos 0.9987`` embeddings, ``rel.err 0.012`` numbers.
The legend under the table says what every marker and figure means, each
output's task, the evidence for it and the ``--set`` that changes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from compressor.results import ReportData

#: A FAILED variant's message is cut to this many characters in the table (in full below it).
FAILED_IN_TABLE = 60
#: Below this mean (or minimum) cosine the minimum is shown too.
COSINE_MIN_SHOWN = 0.99
#: What each headline figure's short tag means.
TAGS = {
    "top1_agreement": ("", "share of examples whose top-1 class is the original's"),
    "decision_agreement": ("", "share of examples whose decision at the threshold is the original's"),
    "label_agreement": ("", "share of examples whose output is exactly the original's"),
    "neighbour_agreement": ("nn ", "share of examples whose nearest neighbour is the original's; cos: mean "
                            "cosine similarity (min: the lowest)"),
    "next_token_agreement": ("", "share of positions whose next-token top-1 is the original's"),
    "position_agreement": ("pos ", "share of positions whose top-1 class is the original's"),
    "exact_match": ("exact ", "share of examples whose decoded string is exactly the original's"),
    "pixel_agreement": ("px ", "share of pixels whose decision is the original's"),
    "f1": ("F1 ", "F1 of the yes decisions against the original's"),
    "detection_f1": ("det F1 ", "F1 of the original's detections found at IoU 0.5 (recall and precision "
                     "in report.json)"),
    "box_agreement": ("box ", "share of examples whose every box overlaps the original's at IoU 0.5"),
    "score_agreement": ("", "share of examples whose every score decision is the original's"),
}


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def output_figure(entry: Mapping[str, Any]) -> str | None:
    """One output's headline figure as short text (with NaN/Inf when its values had some)."""
    metric, agreement = entry.get("headline_metric"), entry.get("agreement")
    parts = []
    if _finite(agreement):
        tag = TAGS.get(str(metric), ("", ""))[0]
        parts.append(f"{tag}{_percent(agreement)}")
    cosine = entry.get("cosine") if isinstance(entry.get("cosine"), Mapping) else {}
    if entry.get("task") == "embedding" and _finite(cosine.get("mean")):
        parts.append(cosine_text(cosine))
    error = entry.get("relative_error")
    if not parts and isinstance(error, Mapping) and _finite(error.get("mean")):
        parts.append(f"rel.err {error['mean']:.3g}")
    if not parts and entry.get("error"):
        parts.append("not compared")
    nonfinite = entry.get("nonfinite")
    if isinstance(nonfinite, Mapping) and nonfinite.get("examples"):
        parts.append(f"NaN/Inf {_percent(float(nonfinite.get('share') or 0))}")
    return " ".join(parts) or None


def cosine_text(cosine: Mapping[str, Any]) -> str:
    text = f"cos {cosine['mean']:.4f}"
    low = cosine.get("min")
    if _finite(low) and (low < COSINE_MIN_SHOWN or cosine["mean"] < COSINE_MIN_SHOWN):
        text += f" min {low:.4f}"
    return text


def agreement_cell(metrics: Mapping[str, Any]) -> str:
    """The ``agreement`` column of one variant: every compared output's headline figure
    (named when there are several), else the variant-wide agreement or cosine."""
    outputs = metrics.get("outputs")
    if isinstance(outputs, Mapping) and outputs:
        figures = [(name, output_figure(entry)) for name, entry in outputs.items() if isinstance(entry, Mapping)]
        figures = [(name, text) for name, text in figures if text]
        if len(figures) == 1:
            return figures[0][1]
        if figures:
            return "; ".join(f"{name} {text}" for name, text in figures)
    agreement = metrics.get("agreement")
    if _finite(agreement):
        return _percent(agreement)
    cosine = metrics.get("cosine")
    if isinstance(cosine, Mapping) and _finite(cosine.get("mean")):
        return cosine_text(cosine)
    return "-"


def failed_cell(error: str) -> str:
    first = error.strip().splitlines()[0] if error.strip() else ""
    short = first if len(first) <= FAILED_IN_TABLE else first[: FAILED_IN_TABLE - 3].rstrip() + "..."
    return f"FAILED: {short}" + (" (below)" if short != error.strip() else "")


def legend(report: ReportData) -> list[str]:
    """Lines under the table: the markers shown, what the agreement figures are, each output's task."""
    variants = report.variants
    lines = []
    if variants:
        lines.append(f"smaller: {variants[0].name}'s size / the variant's; '-': not measured")
    if any(v.budget_failures for v in variants):
        lines.append("!: outside the budget (why: below)")
    if any(v.warnings for v in variants):
        lines.append("?: worse than it looks (warnings below); never picked as the best trade-off")
    if any(v.error for v in variants):
        lines.append("FAILED: the variant could not be made or measured (the full message below)")
    used = sorted({str(entry.get("headline_metric")) for v in variants
                   for entry in (v.metrics.get("outputs") or {}).values()
                   if isinstance(entry, Mapping) and entry.get("headline_metric") in TAGS})
    for metric in used:
        tag, meaning = TAGS[metric]
        lines.append(f"agreement {tag.strip() or '%'}: {meaning}")
    if any("relative_error" in entry for v in variants for entry in (v.metrics.get("outputs") or {}).values()
           if isinstance(entry, Mapping) and "agreement" not in entry):
        lines.append("agreement rel.err: mean relative error ||variant - original|| / ||original|| per example")
    return lines + output_tasks(report)


def output_tasks(report: ReportData) -> list[str]:
    """One line per output of the first variant compared output by output: its task and why."""
    for variant in report.variants:
        outputs = variant.metrics.get("outputs")
        if isinstance(outputs, Mapping) and outputs:
            lines = []
            for name, entry in outputs.items():
                if not isinstance(entry, Mapping):
                    continue
                task = entry.get("task") or "not compared"
                lines.append(f"output {name}: {task}, {entry.get('reason', '')} (--set task.{name}=TASK to "
                             "change)")
            return lines
    return []
