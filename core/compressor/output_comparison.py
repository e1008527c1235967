"""A variant's outputs against the original's, all of them, and the figures a variant is judged by.

Per output (:func:`compressor.comparing.compare_output`): its task's measures and
headline figure (``agreement``). For the variant as a whole:

- the **compared output**: the one the labels belong to
  (:func:`compressor.tasks.label_output`), else the first with a headline figure;
  its measures (accuracy, confusion, changed inputs, cosine, ...) are also given at
  the top of the variant's metrics;
- ``agreement`` at the top is the **lowest** headline figure of all outputs (the one
  ``--min-agreement``, the warnings and ``Report.best`` read), ``agreement_output``
  names its output;
- ``nonfinite``: per output with NaN or Inf, how many examples (see
  :func:`compressor.comparing.nonfinite_counts`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class MeasuredOutputs(Protocol):
    """What a measurement holds of its outputs (``compressor.worker.MeasuredArtifact``)."""

    @property
    def output_info(self) -> Mapping[str, Mapping[str, Any]]:
        """``{output: {"task", "reason", "shape", "params"?}}``"""

    @property
    def kept(self) -> Mapping[str, Mapping[str, Any]]:
        """``{output: {kind: array}}``"""


def compare_outputs(reference: MeasuredOutputs, variant: MeasuredOutputs, labels: Any | None,
                    headline_keys: Sequence[str]) -> dict[str, Any]:
    from compressor.comparing import compare_output, nonfinite_counts
    from compressor.fidelity import flat_labels
    from compressor.tasks import label_output

    infos: Mapping[str, Mapping[str, Any]] = reference.output_info
    flat = flat_labels(labels)
    labelled = label_output(infos, labels=flat if flat is not None else labels) if infos else None
    variant_infos = variant.output_info or {}
    outputs: dict[str, Any] = {}
    for name, info in infos.items():
        task, params = info.get("task"), info.get("params") or {}
        entry: dict[str, Any] = dict(info)
        counts = None
        if name in reference.kept or name in variant.kept:
            counts = nonfinite_counts(reference.kept.get(name, {}), variant.kept.get(name, {}))
        if counts:
            entry["nonfinite"] = counts
        if task is None:
            entry["compared"] = False
        elif params.get("layout") == "pair-scores":
            entry["compared_with"] = params.get("boxes")
        elif name not in reference.kept or name not in variant.kept:
            entry["compared"] = False
        else:
            mismatch = _mismatch(name, info, variant_infos.get(name))
            if mismatch:
                entry.update({"compared": False, "error": mismatch})
            else:
                entry.update(compare_output(task, reference.kept[name], variant.kept[name],
                                            labels if name == labelled else None, params))
        outputs[name] = entry
    return _summary(outputs, labelled, headline_keys)


def _mismatch(name: str, info: Mapping[str, Any], mine: Mapping[str, Any] | None) -> str | None:
    """Why the variant's output was kept differently from the original's (then they cannot be compared)."""
    if mine is None or not mine.get("task"):
        return None
    if mine.get("task") == info.get("task") and (mine.get("params") or {}) == (info.get("params") or {}):
        return None
    return (f"the variant's output was read as {mine.get('task')} ({mine.get('reason')}), the original's as "
            f"{info.get('task')}: --set task.{name}={info.get('task')} to compare them as the original's")


def _summary(outputs: dict[str, Any], labelled: str | None, headline_keys: Sequence[str]) -> dict[str, Any]:
    compared = [name for name, entry in outputs.items()
                if entry.get("compared", True) and "compared_with" not in entry and "error" not in entry]
    with_figure = [name for name in compared if isinstance(outputs[name].get("agreement"), (int, float))]
    primary = labelled if labelled in compared else (with_figure or compared or [None])[0]
    summary: dict[str, Any] = {"outputs": outputs}
    if primary is not None:
        first = outputs[primary]
        summary.update({key: first[key] for key in headline_keys if key in first})
        summary["compared_output"] = primary
        summary["task"] = first["task"]
    if with_figure:
        worst = min(with_figure, key=lambda name: outputs[name]["agreement"])
        entry = outputs[worst]
        summary["agreement"] = entry["agreement"]
        summary["headline_metric"] = entry.get("headline_metric")
        kind = entry.get("agreement_kind", "top-1")
        summary["agreement_kind"] = kind if len(outputs) == 1 else f"{worst}: {kind}"
        summary["agreement_output"] = worst
    broken = {name: entry["nonfinite"] for name, entry in outputs.items() if "nonfinite" in entry}
    if broken:
        summary["nonfinite"] = broken
    return {key: value for key, value in summary.items() if value is not None}
