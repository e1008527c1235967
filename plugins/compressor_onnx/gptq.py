"""GPTQ's weight update, in place of the one ONNX Runtime 1.32 ships.

ONNX Runtime's ``neural_compressor/weight_only.py`` ``gptq`` spreads each
row's rounding error with ``Hinv[i:, i]``, a column of the *upper* triangular
Cholesky factor of H^-1: below the diagonal it is zero, so no error is ever
propagated and the result does not depend on the calibration data at all (two
different calibration sets give identical bytes; see
tests/test_onnx_quantization.py). The GPTQ paper (Frantar et al., 2022,
Algorithm 1) uses the row ``Hinv[i, i:]``. This is that algorithm with ONNX
Runtime's layout (W is ``[in, out]``, rows are input channels), its grid
(min/max per group, zero included) and its signature, so ``gptq_quantize``
calls it unchanged while ``patched_gptq`` is active.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def _grid(weights: Any, maxq: int, symmetric: bool) -> tuple[Any, Any]:
    """Scale and zero point per output column of ``weights`` ``[rows, out]``: shapes ``[out, 1]``."""
    import numpy as np

    low = np.minimum(weights.min(axis=0), 0)
    high = np.maximum(weights.max(axis=0), 0)
    if symmetric:
        high = np.maximum(np.abs(low), high)
        low = np.where(low < 0, -high, low)
    empty = (low == 0) & (high == 0)
    low, high = np.where(empty, -1, low), np.where(empty, 1, high)
    scale = (high - low) / maxq
    zero = np.full(scale.shape, (maxq + 1) / 2) if symmetric else np.round(-low / scale)
    return scale.reshape(-1, 1), zero.reshape(-1, 1)


def gptq(W: Any, H: Any, num_bits: int = 4, group_size: int = 32, scheme: str = "asym",  # noqa: N803
         blocksize: int = 128, percdamp: float = 0.01, actorder: bool = False, mse: bool = False,
         perchannel: bool = True) -> Any:
    """Fake-quantized ``W`` ``[in, out]`` minimizing ``||X W - X Q||`` for ``H = 2 X^T X / n``."""
    import numpy as np

    W = W.astype(np.float64, copy=True)  # noqa: N806
    H = H.astype(np.float64, copy=True)  # noqa: N806
    rows = W.shape[0]
    maxq = 2**num_bits - 1
    symmetric = scheme == "sym"
    group = group_size if group_size != -1 else rows
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[dead, :] = 0
    order = np.argsort(np.diag(H))[::-1] if actorder else np.arange(rows)
    W, H = W[order, :], H[order][:, order]  # noqa: N806
    H[np.arange(rows), np.arange(rows)] += percdamp * np.mean(np.diag(H))
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # noqa: N806 - upper triangular
    Q = np.zeros_like(W)  # noqa: N806
    scale, zero = _grid(W[:group], maxq, symmetric)
    for start in range(0, rows, blocksize):
        stop = min(start + blocksize, rows)
        block = W[start:stop].copy()
        errors = np.zeros_like(block)
        inverse = Hinv[start:stop, start:stop]
        for i in range(stop - start):
            row = start + i
            if row % group == 0:
                scale, zero = _grid(block[i:i + group] if i + group <= stop - start else
                                    np.concatenate([block[i:], W[stop:row + group]]), maxq, symmetric)
            w = block[i]
            q = (scale * (np.clip(np.round(w[:, None] / scale) + zero, 0, maxq) - zero)).ravel()
            Q[row] = q
            error = (w - q) / inverse[i, i]
            block[i:] -= np.outer(inverse[i, i:], error)
            errors[i] = error
        W[stop:] -= Hinv[start:stop, stop:].T @ errors
    return Q[np.argsort(order)].astype(np.float32)


@contextlib.contextmanager
def patched_gptq() -> Iterator[None]:
    """ONNX Runtime's ``gptq_quantize`` with the weight update above."""
    from onnxruntime.quantization.neural_compressor import weight_only

    original = weight_only.gptq
    weight_only.gptq = gptq
    try:
        yield
    finally:
        weight_only.gptq = original
