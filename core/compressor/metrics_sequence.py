"""CTC outputs: greedy decoding in the measuring process, whole strings compared in the parent.

Greedy decoding takes the top class at each position, collapses repeats and
drops the blank: ``a a - a b b -`` reads ``a a b``. What users of a recogniser read
is the string, so a variant is compared by the share of examples whose string is
exactly the original's (``exact_match``, the headline) and by the character error
rate against the original's string (edit distance / its length).
"""

from __future__ import annotations

from typing import Any

#: Changed examples listed in reports, as for classifiers.
MAX_CHANGED_EXAMPLES = 10


def time_by_class(values: Any, class_axis: int) -> Any:
    """``[N, T, C]``: the class axis last, every other non-batch axis flattened into positions
    (a ``[T, N, C]`` output run one example at a time arrives as ``[N, T, 1, C]``)."""
    import numpy as np

    moved = np.moveaxis(np.asarray(values), class_axis, -1)
    return moved.reshape(len(moved), -1, moved.shape[-1])


def ctc_decode(values: Any, class_axis: int, blank: int) -> Any:
    """Greedy CTC decoding of every example: ``[N, L]`` class ids, padded with -1 (L >= 1)."""
    import numpy as np

    ids = time_by_class(values, class_axis).argmax(axis=-1)
    if not ids.size:
        return np.full((len(ids), 1), -1, dtype=np.int32)
    fresh = np.ones_like(ids, dtype=bool)
    fresh[:, 1:] = ids[:, 1:] != ids[:, :-1]
    kept = fresh & (ids != blank)
    lengths = kept.sum(axis=1)
    order = np.argsort(~kept, axis=1, kind="stable")
    decoded = np.take_along_axis(ids, order, axis=1).astype(np.int32)
    decoded[np.arange(decoded.shape[1])[None, :] >= lengths[:, None]] = -1
    return decoded[:, :max(1, int(lengths.max(initial=0)))]


def edit_distance(first: Any, second: Any) -> int:
    """Levenshtein distance between two 1-D arrays (insertions, deletions, substitutions)."""
    import numpy as np

    first, second = np.asarray(first), np.asarray(second)
    if not first.size or not second.size:
        return int(max(first.size, second.size))
    steps = np.arange(second.size + 1)
    previous = steps.copy()
    for row, item in enumerate(first, start=1):
        current = np.empty_like(previous)
        current[0] = row
        current[1:] = np.minimum(previous[1:] + 1, previous[:-1] + (second != item))
        # An insertion costs 1 more than the cell to the left: a running minimum.
        previous = np.minimum.accumulate(current - steps) + steps
    return int(previous[-1])


def _string(row: Any) -> list[int]:
    return [int(item) for item in row if item >= 0]


def compare(reference: Any, variant: Any, nonfinite: Any | None) -> dict[str, Any]:
    """``exact_match``: the share of examples whose decoded string is the original's; an
    example whose output holds NaN or Inf never matches. ``char_error_rate``: mean edit
    distance over the original string's length (an empty original: the variant's length)."""
    rows = min(len(reference), len(variant))
    same, errors, changed = 0, [], []
    empty_variant = empty_original = 0
    for index in range(rows):
        original, compressed = _string(reference[index]), _string(variant[index])
        broken = nonfinite is not None and index < len(nonfinite) and bool(nonfinite[index])
        empty_original += not original
        empty_variant += not compressed
        if original == compressed and not broken:
            same += 1
            errors.append(0.0)
            continue
        distance = len(original) if broken else edit_distance(original, compressed)
        errors.append(distance / max(1, len(original)))
        changed.append({"index": index, "original": _shown(original), "compressed": _shown(compressed)})
    return {
        "exact_match": same / rows if rows else None,
        "char_error_rate": sum(errors) / rows if rows else None,
        "empty_strings": {"original": empty_original, "variant": empty_variant},
        "changed_count": len(changed),
        "changed_examples": changed[:MAX_CHANGED_EXAMPLES],
        "agreement_kind": "decoded string equal to the original's (greedy CTC)",
    }


def _shown(string: list[int]) -> str:
    """A decoded string as class ids (the model's alphabet is not known here)."""
    text = " ".join(str(item) for item in string[:40])
    return (text + " ...") if len(string) > 40 else (text or "(empty)")
