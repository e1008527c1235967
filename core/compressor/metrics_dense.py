"""Dense outputs decided per element: maps (per pixel, over a channel axis or at a
threshold) and multi-label probabilities (each element at a threshold).

The measuring process keeps only the decisions, packed to bits where they are
yes/no; the parent compares them with the original's. An example whose variant
output holds NaN or Inf counts as wrong at every element.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

#: Rows unpacked at a time when comparing (bounds the parent's memory on large maps).
CHUNK_ROWS = 64


def _packed(decided: Any) -> dict[str, Any]:
    import numpy as np

    flat = np.asarray(decided, dtype=bool).reshape(len(decided), -1)
    return {"bits": np.packbits(flat, axis=1), "bit_count": np.asarray([flat.shape[1]], dtype=np.int64)}


def map_decisions(values: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Each pixel's decision: the top channel along ``channel_axis``, or above ``threshold``
    for a map of one channel (or none)."""
    import numpy as np

    values = np.asarray(values)
    axis = params.get("channel_axis")
    threshold = params.get("threshold", 0.5)
    if axis is None:
        return _packed(values > threshold)
    channels = values.shape[axis]
    if channels == 1:
        return _packed(np.take(values, 0, axis=axis) > threshold)
    top = values.argmax(axis=axis).reshape(len(values), -1)
    if channels == 2:
        return _packed(top == 1)
    return {"pixels": top.astype(np.uint8 if channels <= 255 else np.int32)}


def multilabel_decisions(values: Any, threshold: float) -> dict[str, Any]:
    import numpy as np

    return _packed(np.asarray(values) > threshold)


def _rows(kept: dict[str, Any], start: int, stop: int) -> Any:
    import numpy as np

    if "bits" in kept:
        count = int(np.asarray(kept["bit_count"]).ravel()[0])
        return np.unpackbits(kept["bits"][start:stop], axis=1, count=count).astype(np.int32)
    return np.asarray(kept["pixels"][start:stop]).astype(np.int32)


def _chunks(reference: dict[str, Any], variant: dict[str, Any], nonfinite: Any | None) -> Iterator[tuple[Any, Any]]:
    """``(original, variant)`` decisions, a few rows at a time; broken rows made all wrong."""
    import numpy as np

    rows = min(len(reference.get("bits", reference.get("pixels", []))),
               len(variant.get("bits", variant.get("pixels", []))))
    for start in range(0, rows, CHUNK_ROWS):
        stop = min(rows, start + CHUNK_ROWS)
        ref, var = _rows(reference, start, stop), _rows(variant, start, stop)
        if ref.shape != var.shape:
            raise ValueError(f"decisions differ in shape: {list(ref.shape)} vs {list(var.shape)}")
        if nonfinite is not None:
            broken = np.asarray(nonfinite[start:stop], dtype=bool)
            if broken.any():
                var = var.copy()
                var[broken] = np.where(ref[broken] == 0, 1, 0) if "bits" in reference else -1
        yield ref, var


def compare_map(reference: dict[str, Any], variant: dict[str, Any], nonfinite: Any | None) -> dict[str, Any]:
    """``pixel_agreement`` (the headline): the share of pixels whose decision is the
    original's; ``examples_identical``; ``mean_iou`` over the classes either map shows
    (``foreground_iou`` for yes/no maps: the pixels decided yes)."""
    import numpy as np

    same = total = identical = examples = 0
    binary = "bits" in reference
    confusion: dict[tuple[int, int], int] = {}
    for ref, var in _chunks(reference, variant, nonfinite):
        equal = ref == var
        same += int(equal.sum())
        total += equal.size
        identical += int(equal.all(axis=1).sum())
        examples += len(ref)
        width = int(max(ref.max(initial=0), var.max(initial=0))) + 2
        counts = np.bincount(((ref + 1) * width + (var + 1)).ravel())
        for code in np.flatnonzero(counts).tolist():
            pair = (code // width - 1, code % width - 1)
            confusion[pair] = confusion.get(pair, 0) + int(counts[code])
    if not total:
        return {}
    metrics: dict[str, Any] = {
        "pixel_agreement": same / total,
        "examples_identical": identical / examples,
        "agreement_kind": "decision per pixel equal to the original's",
    }
    classes = sorted({item for pair in confusion for item in pair if item >= 0})
    ious = {}
    for label in classes:
        both = confusion.get((label, label), 0)
        either = sum(count for (before, after), count in confusion.items() if label in (before, after))
        if either:
            ious[label] = both / either
    if binary:
        metrics["foreground_iou"] = ious.get(1, 1.0)
    elif ious:
        metrics["mean_iou"] = float(np.mean(list(ious.values())))
    return metrics


def compare_multilabel(reference: dict[str, Any], variant: dict[str, Any],
                       nonfinite: Any | None) -> dict[str, Any]:
    """``f1`` (the headline) of the variant's yes decisions against the original's,
    over every element of every example (1.0 when neither says yes anywhere);
    ``exact_match``: examples whose every decision is the original's."""
    true_positive = false_positive = false_negative = identical = examples = 0
    positives_original = positives_variant = 0
    for ref, var in _chunks(reference, variant, nonfinite):
        ref, var = ref.astype(bool), var.astype(bool)
        true_positive += int((ref & var).sum())
        false_positive += int((~ref & var).sum())
        false_negative += int((ref & ~var).sum())
        identical += int((ref == var).all(axis=1).sum())
        examples += len(ref)
        positives_original += int(ref.sum())
        positives_variant += int(var.sum())
    if not examples:
        return {}
    denominator = 2 * true_positive + false_positive + false_negative
    return {
        "f1": 2 * true_positive / denominator if denominator else 1.0,
        "exact_match": identical / examples,
        "positives": {"original": positives_original, "variant": positives_variant},
        "changed_count": examples - identical,
        "agreement_kind": "F1 of the variant's yes decisions against the original's",
    }
