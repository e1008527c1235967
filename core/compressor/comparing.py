"""Compare one output of a variant with the original's, by the output's task.

The measuring processes keep per output what :func:`compressor.tasks.keep`
says; here the original's and the variant's are set side by side. Every
function returns plain numbers for ``report.json`` (see docs/report-format.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from compressor import fidelity

#: An example counts as a changed detection when its IoU with the original box is below this.
IOU_MATCH = 0.5


def compare_output(task: str, reference: Mapping[str, Any], variant: Mapping[str, Any],
                   labels: Any | None) -> dict[str, Any]:
    """Metrics of one output: ``agreement`` (share of examples whose decision is the
    original's) wherever a decision exists, plus the task's own measures."""
    import numpy as np

    if "labels" in reference and "labels" in variant:
        return _agreement(reference["labels"], variant["labels"])
    if task == "classifier":
        metrics = fidelity.compare(reference["top1"], variant["top1"], labels)
        accuracy = fidelity.accuracy(variant["top1"], labels) if labels is not None else None
        if accuracy is not None:
            metrics["accuracy"] = accuracy
        metrics["cosine"] = _cosine(reference["scores"], variant["scores"])
        return _without_none(metrics)
    if task == "embedding":
        ref, var = reference["vectors"], variant["vectors"]
        metrics: dict[str, Any] = {"cosine": fidelity.cosine(ref, var)}
        if len(ref) > 1:
            before, after = nearest_neighbours(ref), nearest_neighbours(var)
            metrics["agreement"] = float(np.mean(before == after))
            metrics["agreement_kind"] = "nearest neighbour among the evaluation examples"
            flat = fidelity.flat_labels(labels)
            if flat is not None and len(flat) == len(var):
                metrics["accuracy"] = float(np.mean(flat[after] == flat))
        return _without_none(metrics)
    if task in ("sequence", "language-model"):
        return _without_none(_positions(task, reference, variant))
    if task == "detection":
        if "boxes" in reference:
            return _boxes(reference["boxes"], variant["boxes"])
        return _agreement(reference["detected"], variant["detected"])
    return _without_none(_regression(reference["values"], variant["values"]))


def nearest_neighbours(embeddings: Any) -> Any:
    """For each row, the index of its most cosine-similar other row."""
    import numpy as np

    unit = embeddings / np.clip(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12, None)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def _agreement(reference: Any, variant: Any) -> dict[str, Any]:
    import numpy as np

    ref, var = np.asarray(reference), np.asarray(variant)
    if ref.shape != var.shape:
        return {"error": f"output shapes differ: {list(ref.shape)} vs {list(var.shape)}"}
    same = (ref == var).reshape(len(ref), -1).all(axis=1)
    return {"agreement": float(same.mean()), "changed_count": int((~same).sum())}


def _positions(task: str, reference: Mapping[str, Any], variant: Mapping[str, Any]) -> dict[str, Any]:
    """Per-position top-1 agreement (only unmasked positions), whole-sequence agreement,
    and for language models the perplexity on the evaluation tokens."""
    import numpy as np

    ref, var = np.asarray(reference["top1"]), np.asarray(variant["top1"])
    if ref.shape != var.shape:
        return {"error": f"output shapes differ: {list(ref.shape)} vs {list(var.shape)}"}
    mask = reference.get("mask")
    valid = np.ones(ref.shape, dtype=bool) if mask is None else np.asarray(mask).astype(bool)
    same = (ref == var) | ~valid
    metrics: dict[str, Any] = {
        "agreement": float((ref == var)[valid].mean()) if valid.any() else None,
        "agreement_kind": "next-token top-1 per position" if task == "language-model" else "top-1 per position",
        "sequence_agreement": float(same.reshape(len(same), -1).all(axis=1).mean()),
        "changed_count": int((~same.reshape(len(same), -1).all(axis=1)).sum()),
        "cosine": _cosine(reference.get("logits", reference.get("scores")),
                          variant.get("logits", variant.get("scores"))),
    }
    if "next_token_nll" in variant and "next_token_nll" in reference:
        metrics["perplexity"] = _perplexity(variant["next_token_nll"], mask)
        metrics["perplexity_original"] = _perplexity(reference["next_token_nll"], mask)
    return metrics


def _perplexity(nll: Any, mask: Any | None) -> float:
    import numpy as np

    nll = np.asarray(nll, dtype=np.float64)
    if mask is not None:
        targets = np.asarray(mask)[:, 1:].astype(bool)
        return float(np.exp(nll[targets].mean())) if targets.any() else float("nan")
    return float(np.exp(nll.mean()))


def _regression(reference: Any, variant: Any) -> dict[str, Any]:
    import numpy as np

    ref, var = _same_rows(reference, variant)
    if ref is None or ref.shape != var.shape:
        return {"error": "output shapes differ"}
    difference = np.linalg.norm((var - ref).reshape(len(ref), -1), axis=1)
    scale = np.linalg.norm(ref.reshape(len(ref), -1), axis=1)
    relative = difference / np.maximum(scale, 1e-12)
    return {
        "relative_error": {"mean": float(relative.mean()), "max": float(relative.max())},
        "max_abs_error": float(np.abs(var - ref).max()) if ref.size else 0.0,
        "cosine": fidelity.cosine(ref, var),
    }


def _boxes(reference: Any, variant: Any) -> dict[str, Any]:
    """Mean IoU of each box with the original's box at the same place (x1, y1, x2, y2)."""
    import numpy as np

    ref, var = _same_rows(reference, variant)
    if ref is None or ref.shape != var.shape:
        return {"error": "output shapes differ"}
    low = np.maximum(ref[..., :2], var[..., :2])
    high = np.minimum(ref[..., 2:], var[..., 2:])
    inter = np.clip(high - low, 0, None).prod(axis=-1)

    def area(box: Any) -> Any:
        return np.clip(box[..., 2:] - box[..., :2], 0, None).prod(axis=-1)

    union = area(ref) + area(var) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 1.0)
    matched = (iou >= IOU_MATCH).reshape(len(iou), -1).all(axis=1)
    return {"iou": {"mean": float(iou.mean()), "min": float(iou.min())},
            "agreement": float(matched.mean()), "agreement_kind": f"every box at IoU >= {IOU_MATCH}"}


def _same_rows(reference: Any | None, variant: Any | None) -> tuple[Any, Any]:
    """Both arrays cut to the rows both kept (the cap may keep fewer of a larger output)."""
    if reference is None or variant is None:
        return None, None
    rows = min(len(reference), len(variant))
    return reference[:rows], variant[:rows]


def _cosine(reference: Any | None, variant: Any | None) -> dict[str, float] | None:
    ref, var = _same_rows(reference, variant)
    return None if ref is None else fidelity.cosine(ref, var)


def _without_none(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in metrics.items() if value is not None}
