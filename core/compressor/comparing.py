"""Compare one output of a variant with the original's, by the output's task.

The measuring processes keep per output what :func:`compressor.tasks.keep`
says; here the original's and the variant's are set side by side. Every
function returns plain numbers for ``report.json`` (see docs/report-format.md).

Each task has one **headline** figure, the one its users read and the one
``--min-agreement`` checks; it is the output's ``agreement``, named by
``headline_metric`` and described by ``agreement_kind``. Regressions and states
have none (relative error and cosine instead). An example whose variant output
holds NaN or Inf counts as changed (its decision never matches the original's)
and is left out of cosine and error means; :func:`nonfinite_counts` says how many.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from compressor import fidelity

#: An example counts as a changed detection when its IoU with the original box is below this.
IOU_MATCH = 0.5
#: Shown instead of a decision an output with NaN or Inf could not make.
NOT_FINITE = "NaN/Inf"


def compare_output(task: str, reference: Mapping[str, Any], variant: Mapping[str, Any],
                   labels: Any | None, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Metrics of one output: its headline ``agreement`` (where the task has one) and
    ``headline_metric``, plus the task's own measures. ``labels`` only for the output
    the labels belong to (:func:`compressor.tasks.label_output`)."""
    params = params or {}
    nonfinite = variant.get("nonfinite")
    if "labels" in reference and "labels" in variant:
        return _headline(_agreement(reference["labels"], variant["labels"]), "label_agreement")
    if task in ("classifier", "probability"):
        return _without_none(_decisions(task, reference, variant, labels))
    if task == "embedding":
        return _without_none(_embedding(reference["vectors"], variant["vectors"], labels))
    if task in ("sequence", "language-model"):
        metric = "next_token_agreement" if task == "language-model" else "position_agreement"
        return _headline(_without_none(_positions(task, reference, variant, nonfinite)), metric)
    if task == "multi-label":
        return _dense("compare_multilabel", "f1", reference, variant, nonfinite)
    if task == "map":
        return _dense("compare_map", "pixel_agreement", reference, variant, nonfinite)
    if task == "ctc":
        from compressor import metrics_sequence

        found = metrics_sequence.compare(reference["strings"], variant["strings"], nonfinite)
        return _headline(_without_none(found), "exact_match", found.get("exact_match"))
    if task == "detection":
        return _detection(reference, variant, nonfinite)
    return _without_none(_regression(reference["values"], variant["values"]))


def _headline(metrics: dict[str, Any], name: str, value: Any = "agreement") -> dict[str, Any]:
    figure = metrics.get("agreement") if value == "agreement" else value
    if isinstance(figure, (int, float)) and "error" not in metrics:
        metrics["agreement"] = float(figure)
        metrics["headline_metric"] = name
    return metrics


def _dense(function: str, figure: str, reference: Mapping[str, Any], variant: Mapping[str, Any],
           nonfinite: Any | None) -> dict[str, Any]:
    from compressor import metrics_dense

    try:
        found = getattr(metrics_dense, function)(reference, variant, nonfinite)
    except ValueError as error:
        return {"error": str(error)}
    return _headline(found, figure, found.get(figure))


def _detection(reference: Mapping[str, Any], variant: Mapping[str, Any], nonfinite: Any | None) -> dict[str, Any]:
    if "detections" in reference and "detections" in variant:
        from compressor import metrics_detection

        found = metrics_detection.compare(dict(reference), dict(variant), nonfinite)
        return _headline(_without_none(found), "detection_f1", found["detection_f1"])
    if "boxes" in reference:
        return _headline(_boxes(reference["boxes"], variant["boxes"]), "box_agreement")
    return _headline(_agreement(reference["detected"], variant["detected"]), "score_agreement")


def _decisions(task: str, reference: Mapping[str, Any], variant: Mapping[str, Any],
               labels: Any | None) -> dict[str, Any]:
    """Top-1 (a classifier) or the decision at the threshold (a probability): agreement,
    confusion, changed examples, accuracy with labels; cosine of the scores, or for a
    probability the absolute error (one number has no direction: never cosine)."""
    import numpy as np

    metrics = fidelity.compare(reference["top1"], variant["top1"], labels)
    _name_broken_decisions(metrics)
    accuracy = fidelity.accuracy(variant["top1"], labels) if labels is not None else None
    if accuracy is not None:
        metrics["accuracy"] = accuracy
    if task == "classifier":
        metrics["cosine"] = _cosine(reference.get("scores"), variant.get("scores"))
        return _headline(metrics, "top1_agreement")
    ref, var = _finite_rows(reference["values"], variant["values"])
    if ref is not None and ref.size:
        difference = np.abs(var.astype(np.float64) - ref)
        metrics["abs_error"] = {"mean": float(difference.mean()), "max": float(difference.max())}
    metrics["agreement_kind"] = "decision at the threshold equal to the original's"
    return _headline(metrics, "decision_agreement")


def _name_broken_decisions(metrics: dict[str, Any]) -> None:
    """Decisions an output with NaN or Inf could not make (kept as -1) shown as such."""
    for example in metrics.get("changed_examples", []):
        for key in ("original", "compressed"):
            if example.get(key) == -1:
                example[key] = NOT_FINITE
    confusion = metrics.get("confusion")
    if confusion:
        confusion["labels"] = [NOT_FINITE if label == -1 else label for label in confusion["labels"]]


def _embedding(ref: Any, var: Any, labels: Any | None) -> dict[str, Any]:
    import numpy as np

    metrics: dict[str, Any] = {"cosine": _cosine(ref, var)}
    if len(ref) > 1 and len(ref) == len(var):
        broken = ~np.isfinite(np.asarray(var)).all(axis=1)
        before, after = nearest_neighbours(ref), nearest_neighbours(np.where(broken[:, None], 0.0, var))
        after[broken] = -1
        metrics["agreement"] = float(np.mean(before == after))
        metrics["agreement_kind"] = "nearest neighbour among the evaluation examples"
        metrics["headline_metric"] = "neighbour_agreement"
        flat = fidelity.flat_labels(labels)
        if flat is not None and len(flat) == len(var):
            metrics["accuracy"] = float(np.mean(np.where(after >= 0, flat[np.clip(after, 0, None)] == flat, False)))
    return metrics


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


def _positions(task: str, reference: Mapping[str, Any], variant: Mapping[str, Any],
               nonfinite: Any | None) -> dict[str, Any]:
    """Per-position top-1 agreement (only unmasked positions), whole-sequence agreement,
    and for language models the perplexity on the evaluation tokens."""
    import numpy as np

    ref, var = np.asarray(reference["top1"]), np.asarray(variant["top1"])
    if ref.shape != var.shape:
        return {"error": f"output shapes differ: {list(ref.shape)} vs {list(var.shape)}"}
    if nonfinite is not None and np.any(nonfinite):
        var = var.copy()
        var[np.asarray(nonfinite, dtype=bool)] = -1
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
    """Relative error per example (mean, max), max absolute error and, for more than one
    number per example, cosine; over the examples both outputs hold finite numbers."""
    import numpy as np

    ref, var = _same_rows(reference, variant)
    if ref is None or ref.shape != var.shape:
        return {"error": "output shapes differ"}
    ref, var = _finite_rows(ref, var)
    if not len(ref):
        return {"error": "no example has finite numbers in both outputs"}
    ref, var = ref.astype(np.float64), var.astype(np.float64)
    difference = np.linalg.norm((var - ref).reshape(len(ref), -1), axis=1)
    scale = np.linalg.norm(ref.reshape(len(ref), -1), axis=1)
    relative = difference / np.maximum(scale, 1e-12)
    metrics: dict[str, Any] = {
        "relative_error": {"mean": float(relative.mean()), "max": float(relative.max())},
        "max_abs_error": float(np.abs(var - ref).max()) if ref.size else 0.0,
    }
    if ref[0].size > 1:
        metrics["cosine"] = fidelity.cosine(ref, var)
    return metrics


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
    iou = np.where(np.isfinite(iou), iou, 0.0)
    matched = (iou >= IOU_MATCH).reshape(len(iou), -1).all(axis=1)
    return {"iou": {"mean": float(iou.mean()), "min": float(iou.min())},
            "agreement": float(matched.mean()), "agreement_kind": f"every box at IoU >= {IOU_MATCH}"}


def _same_rows(reference: Any | None, variant: Any | None) -> tuple[Any, Any]:
    """Both arrays cut to the rows both kept (the cap may keep fewer of a larger output)."""
    if reference is None or variant is None:
        return None, None
    rows = min(len(reference), len(variant))
    return reference[:rows], variant[:rows]


def _finite_rows(reference: Any | None, variant: Any | None) -> tuple[Any, Any]:
    """The rows both arrays hold only finite numbers in (after :func:`_same_rows`)."""
    import numpy as np

    ref, var = _same_rows(reference, variant)
    if ref is None or ref.shape != var.shape:
        return ref, var
    ref, var = np.asarray(ref), np.asarray(var)
    finite = (np.isfinite(ref.reshape(len(ref), -1)).all(axis=1)
              & np.isfinite(var.reshape(len(var), -1)).all(axis=1))
    return (ref, var) if finite.all() else (ref[finite], var[finite])  # no copy of every row


def _cosine(reference: Any | None, variant: Any | None) -> dict[str, float] | None:
    ref, var = _finite_rows(reference, variant)
    return None if ref is None or not len(ref) else fidelity.cosine(ref, var)


def _without_none(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in metrics.items() if value is not None}


def nonfinite_counts(reference: Mapping[str, Any], variant: Mapping[str, Any]) -> dict[str, Any] | None:
    """How many examples of an output hold NaN or Inf: ``examples`` (and their ``share``),
    ``original_examples``, and ``new_examples`` where the original's output is finite."""
    import numpy as np

    mine, theirs = variant.get("nonfinite"), reference.get("nonfinite")
    if mine is None and theirs is None:
        return None
    rows = len(mine if mine is not None else theirs)
    mine = np.zeros(rows, dtype=bool) if mine is None else np.asarray(mine, dtype=bool)
    theirs = np.zeros(rows, dtype=bool) if theirs is None else np.asarray(theirs, dtype=bool)
    shared = min(len(mine), len(theirs))
    new = mine[:shared] & ~theirs[:shared]
    return {"examples": int(mine.sum()), "share": float(mine.mean()) if len(mine) else 0.0,
            "original_examples": int(theirs.sum()), "new_examples": int(new.sum())}
