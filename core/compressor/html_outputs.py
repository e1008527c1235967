"""``report.html``'s per-output fidelity: each output's task and the evidence for it, its
headline figure against the original and its other measures, rounded for reading."""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import Any


def _percent(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "-"


def digits(value: Any, places: int = 4) -> str:
    """A number rounded for reading (``-`` for none)."""
    return f"{value:.{places}f}" if isinstance(value, (int, float)) else "-"


def outputs_table(outputs: Mapping[str, Any], original: str) -> str:
    """Per output: its task and why, its headline figure against the original, the other measures."""
    from compressor.headlines import TAGS, output_figure

    body = []
    for name, entry in outputs.items():
        if not isinstance(entry, Mapping):
            continue
        metric = entry.get("headline_metric")
        meaning = TAGS.get(str(metric), ("", ""))[1]
        figure = output_figure(entry) or "-"
        task = entry.get("task") or "not compared"
        body.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in (
            f"<code>{escape(str(name))}</code>",
            f"<b>{escape(str(task))}</b><br><span class=\"muted\">{escape(str(entry.get('reason', '')))} "
            f"(<code>--set task.{escape(str(name))}=TASK</code> to change)</span>",
            f"{escape(figure)}" + (f'<br><span class="muted">{escape(meaning)}</span>' if meaning else ""),
            escape("; ".join(_details(entry))) or "-",
        )) + "</tr>")
    return "\n".join([
        f"<table><caption>Each output against {escape(original)}.</caption>",
        "<thead><tr><th>output</th><th>task</th><th>headline</th><th>also</th></tr></thead><tbody>",
        *body,
        "</tbody></table>",
    ])


def _details(entry: Mapping[str, Any]) -> list[str]:
    """An output's measures besides its headline figure, rounded for reading."""
    found = []

    def pair(key: str, label: str, places: int = 4) -> None:
        value = entry.get(key)
        if isinstance(value, Mapping) and isinstance(value.get("mean"), (int, float)):
            low = value.get("min", value.get("max"))
            which = "min" if "min" in value else "max"
            found.append(f"{label} mean {digits(value['mean'], places)}, {which} {digits(low, places)}")

    if isinstance(entry.get("changed_count"), int):
        found.append(f"{entry['changed_count']} inputs changed")
    pair("cosine", "cosine")
    pair("relative_error", "relative error")
    pair("abs_error", "absolute error")
    pair("iou", "IoU of matched boxes", 3)
    for key, label in (("recall", "recall"), ("precision", "precision"), ("examples_identical", "identical maps"),
                       ("foreground_iou", "foreground IoU"), ("mean_iou", "mean IoU"),
                       ("sequence_agreement", "whole sequences equal")):
        if isinstance(entry.get(key), (int, float)):
            found.append(f"{label} {_percent(entry[key])}")
    if entry.get("headline_metric") != "exact_match" and isinstance(entry.get("exact_match"), (int, float)):
        found.append(f"examples exactly equal {_percent(entry['exact_match'])}")
    if isinstance(entry.get("char_error_rate"), (int, float)):
        found.append(f"character error rate {digits(entry['char_error_rate'])}")
    for key, label in (("detections", "detections"), ("empty_strings", "empty strings"),
                       ("positives", "yes decisions")):
        counts = entry.get(key)
        if isinstance(counts, Mapping):
            found.append(f"{label}: original {counts.get('original')}, variant {counts.get('variant')}")
    if isinstance(entry.get("perplexity"), (int, float)):
        found.append(f"perplexity {digits(entry['perplexity'], 2)} (original "
                     f"{digits(entry.get('perplexity_original'), 2)})")
    nonfinite = entry.get("nonfinite")
    if isinstance(nonfinite, Mapping) and nonfinite.get("examples"):
        found.append(f"NaN or Inf in {nonfinite['examples']} examples ({_percent(nonfinite.get('share') or 0)})")
    for key in ("note", "error"):
        if entry.get(key):
            found.append(str(entry[key]))
    return found
