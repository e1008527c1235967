"""What each output of a model means, and what of it is kept to compare variants.

Detection, per output (``--set task=...`` or ``--set task.OUTPUT=...`` decides
instead; the report names the choice and why):

==================  =====================================================  ==============================
task                detected when                                          compared by
==================  =====================================================  ==============================
classifier          ``[N, C]``, C >= 2; ``[N, 1]`` with values in [0, 1]  top-1 agreement, confusion,
                                                                           accuracy with labels, cosine
embedding           ``[N, T, H]`` with an ``attention_mask`` input          cosine of mask-mean-pooled
                    (pooled), or an ``[N, D]`` named like an embedding      vectors, nearest-neighbour
                                                                           agreement
language-model      ``[N, T, V]`` logits with ``input_ids`` (V >= 1000 or   next-token top-1 agreement,
                    named logits)                                          logits cosine, perplexity
sequence            other ``[N, T, C]`` (per-position scores, e.g. OCR)    per-position top-1 agreement,
                                                                           whole-sequence agreement
regression          ``[N]``, ``[N, 1]`` outside [0, 1], box-like names       relative error, cosine
detection           ``task=detection``: ``[..., 4]`` outputs are boxes     box IoU; other outputs:
                                                                           agreement of score > 0.5
==================  =====================================================  ==============================
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from compressor.errors import UsageError
from compressor.models import TensorSpec
from compressor.specs import TASKS

_BOX_NAMES = re.compile(r"box|bbox|loc|regress|landm|coord|delta|offset|keypoint|kpt|point", re.I)
_EMBEDDING_NAMES = re.compile(r"embed|pooler|sentence|feature|vector", re.I)
#: Raw float outputs kept per output for cosine similarity; more rows are cut (said in the report).
MAX_KEPT_VALUES = 8_000_000


def chosen_task(name: str, options: Mapping[str, Any]) -> str | None:
    task = options.get(f"task.{name}") or options.get("task")
    if task is not None and task not in TASKS:
        raise UsageError(f"task {task!r} is not one of: {', '.join(TASKS)}")
    return task


_GENERIC_NAME = re.compile(r"(output|out|y|result)?[_:.]?\d*", re.I)


def detect(spec: TensorSpec, outputs: Any, inputs: Sequence[TensorSpec], options: Mapping[str, Any],
           position: int = 0) -> tuple[str, str]:
    """The task of output ``spec`` (``outputs``: its values for every example, batch
    axis first; ``position`` among the outputs) and why."""
    sample = outputs
    chosen = chosen_task(spec.name, options)
    if chosen is not None:
        return chosen, "set with --set task"
    input_names = {item.name for item in inputs}
    shape = tuple(sample.shape[1:])
    if sample.dtype.kind not in "fc":
        return "classifier", f"integer output of {list(shape)} per example: compared as labels"
    shape = (None, *shape)
    shown = "[" + ", ".join("N" if size is None else str(size) for size in shape) + "]"
    if len(shape) >= 3:
        last = shape[-1]
        if "input_ids" in input_names and (last >= 1000 or "logit" in spec.name.lower()):
            return "language-model", f"{shown} logits over a vocabulary of {last} with input_ids"
        if "attention_mask" in input_names:
            return "embedding", "token vectors with an attention_mask: mean-pooled into one vector per example"
        if _BOX_NAMES.search(spec.name):
            return "regression", f"named {spec.name!r}: coordinates"
        return "sequence", f"{shown}: scores per position, compared position by position"
    columns = shape[-1] if len(shape) == 2 else 1
    if _BOX_NAMES.search(spec.name):
        return "regression", f"named {spec.name!r}: coordinates"
    if len(shape) == 2 and _EMBEDDING_NAMES.search(spec.name):
        return "embedding", f"named {spec.name!r}: one vector per example"
    if columns >= 2 and position > 0 and _GENERIC_NAME.fullmatch(spec.name):
        return "regression", (f"[N, {columns}] after the first output, with no name to say what it is "
                              "(boxes, landmarks?): compared as numbers; --set task."
                              f"{spec.name}=classifier if it is one")
    if columns >= 2:
        return "classifier", f"[N, {columns}]: scores per class, top-1 compared"
    if len(shape) <= 2 and sample.size and float(sample.min()) >= 0.0 and float(sample.max()) <= 1.0:
        return "classifier", "one value in [0, 1]: a binary classifier's probability (threshold 0.5)"
    return "regression", f"{shown}: numbers, compared by relative error"


def mean_pool(hidden: Any, attention_mask: Any | None) -> Any:
    """Average the token vectors of each sequence, counting only unmasked tokens."""
    import numpy as np

    if attention_mask is None or attention_mask.shape != hidden.shape[:2]:
        return hidden.mean(axis=1)
    mask = attention_mask[..., None].astype(np.float32)
    return (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)


def keep(task: str, output: Any, feeds: Mapping[str, Any]) -> dict[str, Any]:
    """What of an output (all examples, batch axis first) the parent needs to compare it."""
    import numpy as np

    output = np.asarray(output)
    if output.dtype.kind not in "fc":
        return {"labels": output.reshape(len(output), -1)}
    floats = output.astype(np.float32, copy=False)
    if task == "classifier":
        flat = floats.reshape(len(floats), -1)
        top1 = (flat[:, 0] > 0.5).astype(np.int64) if flat.shape[1] == 1 else flat.argmax(axis=1)
        return {"top1": top1, "scores": _capped(flat)}
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
        return {"top1": floats.argmax(axis=-1), "scores": _capped(floats)}
    if task == "detection":
        if floats.shape[-1] == 4:
            return {"boxes": _capped(floats.reshape(len(floats), -1, 4))}
        return {"detected": (floats.reshape(len(floats), -1) > 0.5).astype(np.int8)}
    return {"values": _capped(floats.reshape(len(floats), -1))}


def _capped(values: Any) -> Any:
    """At most :data:`MAX_KEPT_VALUES` numbers: whole examples from the start."""
    per_row = max(1, values[0].size) if len(values) else 1
    return values[: max(1, MAX_KEPT_VALUES // per_row)]


def _next_token_nll(logits: Any, ids: Any) -> Any:
    """Negative log-likelihood of each next input token, ``[N, T-1]`` (perplexity's terms)."""
    import numpy as np

    shifted = logits[:, :-1].astype(np.float64)
    top = shifted.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(shifted - top).sum(axis=-1)) + top[..., 0]
    target = np.take_along_axis(shifted, ids[:, 1:, None].astype(np.int64), axis=-1)[..., 0]
    return (log_norm - target).astype(np.float32)
