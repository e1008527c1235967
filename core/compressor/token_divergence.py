"""KL divergence of a variant's next-token distributions from the original's, on the eval text.

Sending every position's whole distribution from one measuring process to the next would
cost ``positions x vocabulary`` numbers (1024 x 50,257 floats for GPT-2), so the original
sends, for each scored position, its ``TOP_TOKENS`` most likely tokens and their log
probabilities (:func:`top_tokens`), and the variant's process computes

    KL(P || Q) = sum over those tokens of p log(p / q)  +  p_rest log(p_rest / q_rest)

where ``p_rest``/``q_rest`` are the probability both put on every other token
(:func:`divergences`). That is the exact KL of the two distributions with the other tokens
merged into one outcome: never above the full KL (merging outcomes cannot increase it), and
equal to it when the original's top tokens hold all its mass. ``kl_top_mass`` (the
original's mean probability on them) says how close that is.
"""

from __future__ import annotations

from typing import Any

#: Tokens of the original's distribution kept per position.
TOP_TOKENS = 64
#: The options that carry the original's figures to a variant's measuring process.
REFERENCE_OPTION = "_generation_reference"


def log_probabilities(logits: Any) -> Any:
    """Log-softmax over the last axis, in float64."""
    import numpy as np

    values = np.asarray(logits, dtype=np.float64)
    top = values.max(axis=-1, keepdims=True)
    return values - (np.log(np.exp(values - top).sum(axis=-1, keepdims=True)) + top)


def top_tokens(log_probs: Any, count: int = TOP_TOKENS) -> tuple[list[list[int]], list[list[float]]]:
    """Each row's ``count`` most likely tokens, most likely first, and their log probabilities."""
    import numpy as np

    count = min(count, log_probs.shape[-1])
    chosen = np.argpartition(-log_probs, count - 1, axis=-1)[:, :count]
    values = np.take_along_axis(log_probs, chosen, axis=-1)
    order = np.argsort(-values, axis=-1, kind="stable")
    ids = np.take_along_axis(chosen, order, axis=-1)
    values = np.take_along_axis(values, order, axis=-1)
    return ids.tolist(), values.tolist()


def divergences(reference_ids: Any, reference_log_probs: Any, log_probs: Any) -> tuple[Any, Any]:
    """Per row: KL(original || variant) over the original's top tokens plus the rest merged,
    and the original's probability on its top tokens. ``log_probs``: the variant's, [rows, V]."""
    import numpy as np

    ids = np.asarray(reference_ids, dtype=np.int64)
    p_log = np.asarray(reference_log_probs, dtype=np.float64)
    q_log = np.take_along_axis(log_probs, ids, axis=-1)
    p = np.exp(p_log)
    p_mass = p.sum(axis=-1)
    kl = (p * (p_log - q_log)).sum(axis=-1)
    p_rest = np.clip(1.0 - p_mass, 0.0, 1.0)
    others = np.exp(log_probs)
    np.put_along_axis(others, ids, 0.0, axis=-1)
    q_rest = np.maximum(others.sum(axis=-1), 1e-300)  # summed, not 1 - top: exact where tiny
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = np.where(p_rest > 1e-12, p_rest * (np.log(np.maximum(p_rest, 1e-300)) - np.log(q_rest)), 0.0)
    return np.maximum(kl + rest, 0.0), p_mass


def reference_of(metrics: dict[str, Any]) -> dict[str, Any]:
    """What a variant's process needs of the original's measurement: its top tokens per scored
    position and the memory bandwidth it measured (one bound for every variant)."""
    reference: dict[str, Any] = {}
    if metrics.get("window_topk_ids"):
        reference["ids"] = metrics["window_topk_ids"]
        reference["log_probs"] = metrics["window_topk_logprobs"]
    if metrics.get("memory_bandwidth_source") == "measured (copy)" and metrics.get("memory_bandwidth_gbs"):
        reference["memory_bandwidth_gbs"] = metrics["memory_bandwidth_gbs"]
    return reference
