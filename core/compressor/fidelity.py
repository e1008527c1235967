"""How faithful a variant is to the original: accuracy, agreement, what changed."""

from __future__ import annotations

from typing import Any

#: Confusion matrices are reported up to this many distinct predictions.
MAX_CONFUSION_CLASSES = 50
#: The first N inputs whose top prediction changed are listed in reports.
MAX_CHANGED_EXAMPLES = 10


def flat_labels(labels: Any | None) -> Any | None:
    """Labels as a 1-D array, or None when they are not one label per example
    (e.g. fastText's lists of labels, which its backend scores itself)."""
    if labels is None:
        return None
    import numpy as np

    try:
        array = np.asarray(labels)
    except ValueError:  # ragged lists
        return None
    return array if array.ndim == 1 else None


def accuracy(predictions: Any, labels: Any) -> float | None:
    import numpy as np

    predicted, expected = np.asarray(predictions), flat_labels(labels)
    if expected is None or predicted.shape != expected.shape:
        return None
    return float((predicted == expected).mean())


def compare(
    reference: Any, predictions: Any, labels: Any | None = None
) -> dict[str, Any]:
    """Agreement of ``predictions`` with the original's, the confusion matrix
    original x compressed, and the first inputs whose prediction changed."""
    import numpy as np

    original, compressed = np.asarray(reference), np.asarray(predictions)
    if original.shape != compressed.shape or original.ndim != 1 or original.size == 0:
        return {}
    same = original == compressed
    flat = flat_labels(labels)
    changed = np.flatnonzero(~same)
    result: dict[str, Any] = {
        "agreement": float(same.mean()),
        "changed_count": int(changed.size),
        "changed_examples": [
            {
                "index": int(index),
                "original": original[index].item(),
                "compressed": compressed[index].item(),
                **({"label": flat[index].item()} if flat is not None else {}),
            }
            for index in changed[:MAX_CHANGED_EXAMPLES]
        ],
    }
    classes = sorted(set(original.tolist()) | set(compressed.tolist()), key=str)
    if len(classes) <= MAX_CONFUSION_CLASSES:
        position = {value: i for i, value in enumerate(classes)}
        matrix = [[0] * len(classes) for _ in classes]
        for before, after in zip(original.tolist(), compressed.tolist()):
            matrix[position[before]][position[after]] += 1
        result["confusion"] = {"labels": classes, "matrix": matrix}
    return result


#: Numbers converted to float64 at a time by :func:`cosine` (32 MiB): a language model's logits
#: held for comparison are up to 268 M numbers, which whole in float64 took 6 GB more memory.
COSINE_CHUNK = 1 << 22


def cosine(reference: Any, outputs: Any) -> dict[str, float] | None:
    """Row-wise cosine similarity between two output arrays (embeddings, regressions),
    accumulated in float64 over blocks of at most :data:`COSINE_CHUNK` numbers."""
    import numpy as np

    a, b = np.asarray(reference), np.asarray(outputs)
    if a.shape != b.shape or a.size == 0:
        return None
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    columns = max(1, a.shape[1])
    rows_per_block = max(1, COSINE_CHUNK // columns)
    columns_per_block = min(columns, COSINE_CHUNK)
    sums = np.zeros((3, len(a)))  # a.b, a.a, b.b per row
    for row in range(0, len(a), rows_per_block):
        rows = slice(row, row + rows_per_block)
        for column in range(0, columns, columns_per_block):
            x = a[rows, column: column + columns_per_block].astype(np.float64)
            y = b[rows, column: column + columns_per_block].astype(np.float64)
            sums[:, rows] += (np.einsum("ij,ij->i", x, y), np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y))
    similarity = sums[0] / np.maximum(np.sqrt(sums[1]) * np.sqrt(sums[2]), 1e-12)
    return {"mean": float(similarity.mean()), "min": float(similarity.min())}
