"""What each output of a model means, and what of it is kept to compare variants.

The measuring process decides each output's task from its shape, its values and
the model's other outputs (:mod:`compressor.task_rules`); ``--set task=...`` or
``--set task.OUTPUT=...`` decides instead. The report names every choice, its
evidence and the ``--set`` that changes it. Variants are compared with the
decisions made on the original (:data:`DECIDED_OPTION`).

==============  ==========================================================  ================================
task            inferred when                                               headline figure (others)
==============  ==========================================================  ================================
classifier      ``[N, C]`` (rows summing to 1, or logits of the first        top-1 agreement (accuracy,
                output); integer outputs (labels)                           confusion, cosine)
probability     ``[N]`` / ``[N, 1]`` in [0, 1]                              decision at 0.5 (absolute error)
multi-label     ``[N, K]``, ``[N, K, T]``, ``[N, C, H, W]`` in [0, 1] not    F1 of the decisions at 0.5
                summing to 1 (note activations, independent labels)         (exact match)
embedding       ``[N, T, H]`` with ``attention_mask`` (pooled); ``[N, D]``    nearest-neighbour agreement
                named like an embedding or of unit length                   (cosine mean and min)
language-model  ``[N, T, V]`` with ``input_ids`` (V >= 1000 or logits)      next-token top-1 (perplexity)
ctc             ``[N, T, C]`` (``[T, N, C]`` too), C >= 5, where class 0    exact match of greedy-decoded
                or C-1 wins >= 30% of positions (the blank), no input_ids   strings (character error rate)
sequence        other ``[N, T, C]``                                         top-1 per position
map             ``[N, C, H, W]`` / ``[N, H, W, C]``: top-1 over the small    per-pixel agreement (IoU)
                end axis (softmax or logits); ``[N, 1, H, W]`` at 0.5
                (probabilities) or 0 (logits)
detection       anchor heads ``[N, 4+C, A]``, ``[N, A, 5+C]`` (pixel boxes    F1 of detections at IoU 0.5
                then scores); ``[N, A, 4]`` boxes beside ``[N, A, C]``      after NMS (recall, precision)
                scores
regression      box/landmark names, outputs beside a classifier, images,    none (relative error, cosine)
                ``[N]`` / ``[N, 1]`` outside [0, 1]
state           named like a recurrent state (``stateN``, ``hn``, cache)      none (relative error, cosine)
==============  ==========================================================  ================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from compressor.errors import UsageError
from compressor.models import TensorSpec
from compressor.task_rules import OutputTask, chosen_task, decide_all, decide_one

__all__ = ["DECIDED_OPTION", "MAX_KEPT_VALUES", "OutputTask", "chosen_task", "detect", "examine", "keep",
           "label_output", "mean_pool"]

#: Raw float outputs kept per output for cosine similarity; more rows are cut (said in the report).
MAX_KEPT_VALUES = 8_000_000
#: The option that carries the original's decisions to its variants' measuring processes:
#: ``{output: {"task", "reason", "params", "shape"}}`` (set by core, not by users).
DECIDED_OPTION = "_decided_tasks"
#: The tasks whose outputs labels can belong to, the likeliest first.
LABELLED_TASKS = ("classifier", "probability", "multi-label")


def detect(spec: TensorSpec, outputs: Any, inputs: Sequence[TensorSpec], options: Mapping[str, Any],
           position: int = 0) -> tuple[str, str]:
    """The task of output ``spec`` (``outputs``: its values for every example, batch
    axis first; ``position`` among the outputs) and why, looking at this output alone
    (:func:`examine` also weighs the model's other outputs)."""
    decision = decide_one(spec, outputs, inputs, options, position)
    return decision.task, decision.reason


def examine(specs: Sequence[TensorSpec], values: Mapping[str, Any | None], inputs: Sequence[TensorSpec],
            options: Mapping[str, Any], feeds: Mapping[str, Any],
            positions: Mapping[str, int] | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Decide every output's task and keep what the parent needs to compare it.

    ``values``: each output's values for every example (batch axis first), None where
    its shape changed between examples. Returns ``({output: {"task", "reason", "shape",
    "params"?}}, {output: {kind: array}})`` in the order of ``specs``."""
    import numpy as np

    positions = positions or {spec.name: index for index, spec in enumerate(specs)}
    available = {spec.name: np.asarray(values[spec.name]) for spec in specs if values.get(spec.name) is not None}
    declared_label = options.get("label_output")
    if declared_label and declared_label not in [spec.name for spec in specs]:
        raise UsageError(f"--set label_output={declared_label} names no compared output; the outputs are "
                         f"{', '.join(spec.name for spec in specs)}")
    decisions = {**decide_all(specs, available, inputs, options, positions), **_decided_before(options, available)}
    infos: dict[str, dict[str, Any]] = {}
    kept: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if spec.name not in available:
            infos[spec.name] = {"task": None, "reason": "its shape changes from example to example"}
            continue
        decision = decisions[spec.name]
        infos[spec.name] = decision.info(available[spec.name])
        if declared_label == spec.name:
            infos[spec.name]["label_output"] = True
        kept[spec.name] = keep(decision.task, available[spec.name], feeds, decision.params, available)
    return infos, kept


def _decided_before(options: Mapping[str, Any], available: Mapping[str, Any]) -> dict[str, OutputTask]:
    """The original's decisions, for the outputs of this artifact that still have its shape."""
    decided = options.get(DECIDED_OPTION) or {}
    found = {}
    for name, entry in decided.items():
        if name in available and list(available[name].shape[1:]) == list(entry.get("shape") or []):
            found[name] = OutputTask(entry["task"], entry.get("reason", ""), dict(entry.get("params") or {}))
    return found


def label_output(outputs: Mapping[str, Any], options: Mapping[str, Any] | None = None,
                 labels: Any | None = None) -> str | None:
    """The output that labels (``y`` in the data) belong to: the one accuracy, fine-tuning
    and distillation losses with labels are computed on. Other outputs are matched to
    the original model's instead.

    ``outputs``: the model's outputs in order, ``{name: what is known of it}``, each one of

    - its task, a string (``"classifier"``);
    - its entry in a report or measurement (``report.json``'s ``metrics["outputs"][name]``,
      or ``output_info``): a mapping with ``task``, and ``shape`` / ``label_output`` if known;
    - its values for a few examples, an array with the batch axis first: the task is then
      inferred here as in measuring (all outputs together).

    ``options``: ``--set`` options; ``label_output=NAME`` decides.
    ``labels``: the labels when known: integer class ids pick the first classifier with
    more classes than the largest id, 0/1 labels also fit a probability output.

    Returns the first output whose task is classifier, probability or multi-label and
    that fits the labels (the first of them if none fits, so the label check can say
    why), or None when no output takes labels. Raises :class:`UsageError` when
    ``label_output`` names no output.

    >>> label_output({"boxes": "regression", "landmarks": "regression", "prob": "classifier"})
    'prob'
    """
    names = list(outputs)
    declared = (options or {}).get("label_output")
    if declared:
        if declared not in outputs:
            raise UsageError(f"--set label_output={declared} names no output; the outputs are {', '.join(names)}")
        return str(declared)
    entries = _entries(outputs, options or {})
    marked = [name for name, entry in entries.items() if entry.get("label_output")]
    if marked:
        return marked[0]
    candidates = sorted((name for name in names if entries[name].get("task") in LABELLED_TASKS),
                        key=lambda name: LABELLED_TASKS.index(entries[name]["task"]))
    if not candidates:
        return None
    if labels is None:
        return candidates[0]
    return next((name for name in candidates if _fits(entries[name], labels)), candidates[0])


def _entries(outputs: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every output as ``{"task", "shape", ...}``; arrays are examined together."""
    import numpy as np

    arrays = {name: np.asarray(item) for name, item in outputs.items()
              if not isinstance(item, (str, Mapping)) and item is not None}
    decided: dict[str, OutputTask] = {}
    if arrays:
        specs = [TensorSpec(name, (None, *array.shape[1:]), str(array.dtype)) for name, array in arrays.items()]
        positions = {name: index for index, name in enumerate(outputs)}
        decided = decide_all(specs, arrays, (), options, positions)
    entries: dict[str, dict[str, Any]] = {}
    for name, item in outputs.items():
        if name in decided:
            entries[name] = {"task": decided[name].task, "shape": list(arrays[name].shape[1:])}
        elif isinstance(item, Mapping):
            entries[name] = dict(item)
        else:
            entries[name] = {"task": item}
    return entries


def _fits(entry: Mapping[str, Any], labels: Any) -> bool:
    import numpy as np

    try:
        array = np.asarray(labels)
    except ValueError:
        return False
    shape = [size for size in entry.get("shape") or [] if size != 1]
    if array.dtype.kind not in "iub" or not array.size:
        return entry.get("task") == "multi-label" and array.ndim == 2
    if entry.get("task") == "multi-label":
        return array.ndim == 2 and (not shape or array.shape[1] == int(np.prod(shape)))
    if array.ndim != 1:
        return False
    if entry.get("task") == "probability":
        return int(array.min()) >= 0 and int(array.max()) <= 1
    return not shape or len(shape) > 1 or int(array.max()) < shape[0]


def mean_pool(hidden: Any, attention_mask: Any | None) -> Any:
    """Average the token vectors of each sequence, counting only unmasked tokens."""
    import numpy as np

    if attention_mask is None or attention_mask.shape != hidden.shape[:2]:
        return hidden.mean(axis=1)
    mask = attention_mask[..., None].astype(np.float32)
    return (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)


def keep(task: str, output: Any, feeds: Mapping[str, Any], params: Mapping[str, Any] | None = None,
         outputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What of an output (all examples, batch axis first) the parent needs to compare it,
    with ``nonfinite`` (one flag per example) when any example holds NaN or Inf.
    ``params``: the decision's parameters; ``outputs``: every output's values (a box +
    score pair keeps its detections under the boxes output)."""
    import numpy as np

    output = np.asarray(output)
    if output.dtype.kind not in "fc":
        # Strings travel to the parent as fixed-width text (an object array would need pickle).
        labels = output.reshape(len(output), -1).astype(str) if output.dtype.kind == "O" else \
            output.reshape(len(output), -1)
        if task == "classifier" and labels.shape[1] == 1:
            return {"top1": labels[:, 0]}  # one label per example: a classifier's decision
        return {"labels": labels}
    floats = output.astype(np.float32, copy=False)
    nonfinite = ~np.isfinite(floats.reshape(len(floats), -1)).all(axis=1) if len(floats) else np.zeros(0, bool)
    params = dict(params or {})
    if params.get("layout") == "pair" and outputs is not None and params.get("scores") in outputs:
        scores = np.asarray(outputs[params["scores"]], dtype=np.float32)
        nonfinite |= ~np.isfinite(scores.reshape(len(scores), -1)).all(axis=1)
    kept = _kept(task, floats, feeds, params, outputs or {}, nonfinite)
    if nonfinite.any():
        kept["nonfinite"] = nonfinite
    return kept


def _kept(task: str, floats: Any, feeds: Mapping[str, Any], params: dict[str, Any], outputs: Mapping[str, Any],
          nonfinite: Any) -> dict[str, Any]:
    import numpy as np

    rows = len(floats)
    if task in ("classifier", "probability"):
        flat = floats.reshape(rows, -1)
        threshold = params.get("threshold", 0.5)
        if task == "probability" or flat.shape[1] == 1:
            top1 = (flat[:, 0] > threshold).astype(np.int64)
        else:
            top1 = flat.argmax(axis=1)
        top1[nonfinite] = -1
        if task == "probability":
            return {"top1": top1, "values": flat[:, 0].copy()}
        return {"top1": top1, "scores": _capped(flat)}
    if task == "multi-label":
        from compressor.metrics_dense import multilabel_decisions

        return multilabel_decisions(floats, params.get("threshold", 0.5))
    if task == "map":
        from compressor.metrics_dense import map_decisions

        return map_decisions(floats, params)
    if task == "ctc":
        from compressor.metrics_sequence import ctc_decode

        return {"strings": ctc_decode(floats, params.get("class_axis", floats.ndim - 1), params.get("blank", 0))}
    if task == "detection":
        return _detections(floats, params, outputs)
    if task == "embedding":
        vectors = mean_pool(floats, feeds.get("attention_mask")) if floats.ndim >= 3 else floats
        return {"vectors": vectors.reshape(len(vectors), -1)}
    if task == "language-model":
        kept = {"top1": floats.argmax(axis=-1), "logits": _capped(floats)}
        mask = feeds.get("attention_mask")
        if mask is not None and mask.shape == floats.shape[:2]:
            kept["mask"] = mask.astype(np.int8)
        ids = feeds.get("input_ids")
        if (ids is not None and ids.shape == floats.shape[:2] and floats.shape[1] > 1
                and int(ids.min()) >= 0 and int(ids.max()) < floats.shape[-1]):
            kept["next_token_nll"] = _next_token_nll(floats, ids)
        return kept
    if task == "sequence":
        return {"top1": floats.argmax(axis=params.get("class_axis", -1)), "scores": _capped(floats)}
    return {"values": _capped(floats.reshape(rows, -1))}


def _detections(floats: Any, params: Mapping[str, Any], outputs: Mapping[str, Any]) -> dict[str, Any]:
    import numpy as np

    from compressor import metrics_detection

    layout = params.get("layout")
    if layout == "anchors":
        return metrics_detection.from_anchors(floats, dict(params))
    if layout == "pair" and params.get("scores") in outputs:
        return metrics_detection.from_pair(floats, outputs[params["scores"]], dict(params))
    if layout == "pair-scores":
        return {}
    if floats.shape[-1] == 4 and layout in (None, "boxes"):
        return {"boxes": _capped(floats.reshape(len(floats), -1, 4))}
    return {"detected": (floats.reshape(len(floats), -1) > 0.5).astype(np.int8)}


#: Numbers of logits converted to float64 at a time by :func:`_next_token_nll` (32 MiB).
NLL_CHUNK = 1 << 22


def _capped(values: Any) -> Any:
    """At most :data:`MAX_KEPT_VALUES` numbers: whole examples from the start."""
    per_row = max(1, values[0].size) if len(values) else 1
    return values[: max(1, MAX_KEPT_VALUES // per_row)]


def _next_token_nll(logits: Any, ids: Any) -> Any:
    """Negative log-likelihood of each next input token, ``[N, T-1]`` (perplexity's terms),
    in float64 a block of positions at a time (whole, a language model's logits held for
    comparison took four times their size in float64 temporaries)."""
    import numpy as np

    rows, length = ids.shape
    nll = np.empty((rows, length - 1), dtype=np.float32)
    positions = max(1, NLL_CHUNK // max(1, logits.shape[-1]))
    for row in range(rows):
        for start in range(0, length - 1, positions):
            end = min(start + positions, length - 1)
            block = logits[row, start:end].astype(np.float64)
            top = block.max(axis=-1, keepdims=True)
            log_norm = np.log(np.exp(block - top).sum(axis=-1)) + top[:, 0]
            target = block[np.arange(end - start), ids[row, start + 1: end + 1].astype(np.int64)]
            nll[row, start:end] = log_norm - target
    return nll
