"""Detections from a detector's raw outputs, and a variant's detections against the original's.

In the measuring process an anchor head (YOLO ``[N, 4+C, A]``, ``[N, A, 5+C]``) or a
box + score pair (SSD, UltraFace: ``[N, A, 4]`` and ``[N, A, C]``) becomes each
example's detections: boxes above a score threshold, per-class non-maximum
suppression, at most :data:`MAX_DETECTIONS`. They are kept as ``[N, M, 6]``
(x1, y1, x2, y2, score, class) with a count per example. The parent matches the
variant's detections to the original's (same class, IoU >= :data:`MATCH_IOU`):
recall, precision and F1 of the original's detections.
"""

from __future__ import annotations

from typing import Any

#: Detections kept per example (the usual ``max_det``).
MAX_DETECTIONS = 300
#: Candidates above the score threshold that go into NMS, the best first.
MAX_CANDIDATES = 30_000
#: A variant's detection finds an original's one at this IoU, with the same class.
MATCH_IOU = 0.5


def corners(boxes: Any, form: str) -> Any:
    """``[..., 4]`` boxes as x1, y1, x2, y2 (from centre and size when ``form`` is cxcywh)."""
    import numpy as np

    boxes = np.asarray(boxes, dtype=np.float32)
    if form != "cxcywh":
        return boxes
    centre, half = boxes[..., :2], boxes[..., 2:] / 2
    return np.concatenate([centre - half, centre + half], axis=-1)


def iou_matrix(first: Any, second: Any) -> Any:
    """IoU of every box of ``first`` ``[A, 4]`` with every box of ``second`` ``[B, 4]`` (corners)."""
    import numpy as np

    low = np.maximum(first[:, None, :2], second[None, :, :2])
    high = np.minimum(first[:, None, 2:], second[None, :, 2:])
    inter = np.clip(high - low, 0, None).prod(axis=-1)

    def area(boxes: Any) -> Any:
        return np.clip(boxes[:, 2:] - boxes[:, :2], 0, None).prod(axis=-1)

    union = area(first)[:, None] + area(second)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(boxes: Any, scores: Any, classes: Any, iou: float) -> Any:
    """Indices of the boxes kept by greedy per-class NMS, best score first."""
    import numpy as np

    if not len(boxes):
        return np.zeros(0, dtype=np.int64)
    # Boxes of different classes never overlap once shifted apart by class.
    span = float(np.abs(boxes).max()) + 1.0
    shifted = boxes.astype(np.float64) + (classes.astype(np.float64) * 2 * span)[:, None]
    x1, y1, x2, y2 = shifted.T
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    while order.size and len(kept) < MAX_DETECTIONS:
        best, rest = int(order[0]), order[1:]
        kept.append(best)
        width = np.clip(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0, None)
        height = np.clip(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0, None)
        inter = width * height
        union = areas[best] + areas[rest] - inter
        order = rest[inter <= iou * np.maximum(union, 1e-12)]
    return np.asarray(kept, dtype=np.int64)


def _select(boxes: Any, class_scores: Any, first_class: int, threshold: float, nms_iou: float) -> Any:
    """One example's detections ``[K, 6]`` from corner boxes ``[A, 4]`` and scores ``[A, C]``."""
    import numpy as np

    if class_scores.shape[1] == 0 or not np.isfinite(class_scores).all() or not np.isfinite(boxes).all():
        return np.zeros((0, 6), dtype=np.float32)
    best = class_scores.argmax(axis=1)
    score = class_scores[np.arange(len(best)), best]
    chosen = np.flatnonzero(score > threshold)
    if chosen.size > MAX_CANDIDATES:
        chosen = chosen[np.argsort(-score[chosen], kind="stable")[:MAX_CANDIDATES]]
    kept = chosen[nms(boxes[chosen], score[chosen], best[chosen], nms_iou)]
    return np.column_stack([boxes[kept], score[kept], best[kept] + first_class]).astype(np.float32)


def _stacked(per_example: list[Any]) -> dict[str, Any]:
    import numpy as np

    counts = np.asarray([len(found) for found in per_example], dtype=np.int32)
    table = np.zeros((len(per_example), max(1, int(counts.max(initial=0))), 6), dtype=np.float32)
    for index, found in enumerate(per_example):
        table[index, :len(found)] = found
    return {"detections": table, "detection_counts": counts}


def _activated(scores: Any, activation: str) -> Any:
    import numpy as np

    scores = np.asarray(scores, dtype=np.float32)
    if activation == "sigmoid":
        return 1 / (1 + np.exp(-np.clip(scores, -60, 60)))
    if activation == "softmax":
        shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)
    return scores


def from_anchors(values: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Detections of an anchor head ``[N, 4+C, A]`` / ``[N, A, 4+C]`` (``[N, A, 5+C]`` with objectness)."""
    import numpy as np

    rows = np.moveaxis(np.asarray(values, dtype=np.float32), params["numbers_axis"], 2)  # [N, A, numbers]
    found = []
    for example in rows:
        boxes = corners(example[:, :4], params.get("box_format", "cxcywh"))
        scores = example[:, 4:]
        if params.get("objectness") and scores.shape[1] > 1:
            scores = scores[:, :1] * scores[:, 1:]
        if scores.size and (scores.min() < -1e-3 or scores.max() > 1 + 1e-3):
            scores = _activated(scores, "sigmoid")
        found.append(_select(boxes, scores, 0, params["score_threshold"], params["nms_iou"]))
    return _stacked(found)


def from_pair(boxes: Any, scores: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Detections of ``[N, A, 4]`` boxes with ``[N, A]`` / ``[N, A, C]`` scores."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim == 2:
        scores = scores[..., None]
    scores = _activated(scores, params.get("activation", "none"))
    background = params.get("background")
    first = 0
    if background == 0 and scores.shape[-1] >= 2:
        scores, first = scores[..., 1:], 1
    found = [_select(corners(example_boxes, params.get("box_format", "xyxy")), example_scores, first,
                     params["score_threshold"], params["nms_iou"])
             for example_boxes, example_scores in zip(np.asarray(boxes, dtype=np.float32), scores)]
    return _stacked(found)


def compare(reference: dict[str, Any], variant: dict[str, Any], nonfinite: Any) -> dict[str, Any]:
    """Recall (the original's detections the variant finds), precision (the variant's that
    the original has), their F1, the mean IoU of matched pairs and how many examples changed.
    An example whose variant output holds NaN or Inf finds nothing."""
    import numpy as np

    ref_table, ref_counts = reference["detections"], reference["detection_counts"]
    var_table, var_counts = variant["detections"], variant["detection_counts"]
    rows = min(len(ref_counts), len(var_counts))
    matched = total_ref = total_var = changed = 0
    ious: list[float] = []
    for index in range(rows):
        ref = ref_table[index, :ref_counts[index]]
        var = var_table[index, :var_counts[index]]
        total_ref += len(ref)
        total_var += len(var)
        if nonfinite is not None and index < len(nonfinite) and nonfinite[index]:
            changed += 1
            continue
        pairs = _match(ref, var)
        matched += len(pairs)
        ious.extend(pairs)
        changed += int(len(pairs) != len(ref) or len(pairs) != len(var))
    f1 = 1.0 if total_ref + total_var == 0 else 2 * matched / (total_ref + total_var)
    metrics: dict[str, Any] = {
        "detection_f1": f1,
        "recall": matched / total_ref if total_ref else None,
        "precision": matched / total_var if total_var else None,
        "detections": {"original": total_ref, "variant": total_var, "matched": matched},
        "changed_count": changed,
        "agreement_kind": f"F1 of the original's detections found at IoU >= {MATCH_IOU} (same class)",
    }
    if ious:
        metrics["iou"] = {"mean": float(np.mean(ious)), "min": float(np.min(ious))}
    if total_ref == 0:
        metrics["note"] = "the original detects nothing above the score threshold on this data"
    return metrics


def _match(reference: Any, variant: Any) -> list[float]:
    """Greedy one-to-one matching, the original's best-scored detections first: the IoU of each pair."""
    import numpy as np

    if not len(reference) or not len(variant):
        return []
    overlap = iou_matrix(reference[:, :4], variant[:, :4])
    overlap[reference[:, 5][:, None] != variant[:, 5][None, :]] = 0.0
    taken = np.zeros(len(variant), dtype=bool)
    found = []
    for row in np.argsort(-reference[:, 4], kind="stable"):
        candidates = np.where(taken, -1.0, overlap[row])
        best = int(candidates.argmax())
        if candidates[best] >= MATCH_IOU:
            taken[best] = True
            found.append(float(candidates[best]))
    return found
