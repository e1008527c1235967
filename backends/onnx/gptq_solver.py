"""GPTQ on one weight matrix, in numpy: Frantar et al., 2022, Algorithm 1.

The weight is ONNX's ``[K, N]`` (rows are input channels, the ones GPTQ walks
through). ``H = 2 X^T X / n`` over the rows of the layer's input ``X``, damped by 1%
of its mean diagonal; the walk uses the upper Cholesky factor of ``H^-1``. Rows are
quantized one at a time inside a lazy block of 128 (or the group, if larger): each
row's rounding error, divided by its diagonal, is spread over the block's remaining
rows at once, and over the rows after the block by one matrix product per block.

The grid is MatMulNBits': one scale (and, asymmetric, one 4-bit zero point) per
group of ``group`` consecutive rows of a column, from the minimum and maximum of the
group's weights as they stand when the walk reaches it (zero always representable).
The codes come out directly in that grid, so nothing is rounded a second time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BITS = 4
MAX_CODE = 2**BITS - 1
#: Symmetric blocks have no zero point tensor: MatMulNBits' default is the middle code.
SYMMETRIC_ZERO = 2 ** (BITS - 1)
LAZY_ROWS = 128
DAMPING = 0.01
#: Rows of X whose products are summed in float32 (BLAS's fast path) before the float64 total.
CHUNK_ROWS = 8192


class SolverError(ValueError):
    """No Cholesky factor of H^-1: NaN or infinite activations, or none even with 1000x the damping."""


@dataclass
class QuantizedWeight:
    """Codes ``[K, N]`` (uint8, 0..15), scales and zero points ``[groups, N]``."""

    codes: Any
    scales: Any
    zeros: Any
    group: int
    symmetric: bool

    def dequantized(self) -> Any:
        """The float ``[K, N]`` weight MatMulNBits computes with."""
        import numpy as np

        rows = self.codes.shape[0]
        scales = np.repeat(self.scales, self.group, axis=0)[:rows]
        zeros = np.repeat(self.zeros, self.group, axis=0)[:rows].astype(np.float32)
        return (self.codes.astype(np.float32) - zeros) * scales


class Hessian:
    """``2 X^T X / n`` of one layer input, accumulated in float64 from float32 chunks."""

    def __init__(self, width: int) -> None:
        import numpy as np

        self.width = width
        self.sum = np.zeros((width, width), dtype=np.float64)
        self.rows = 0

    def add(self, activations: Any) -> None:
        """Every row of ``activations`` ``[..., width]`` (a batch, a sequence...) is one sample."""
        import numpy as np

        rows = np.asarray(activations, dtype=np.float32).reshape(-1, self.width)
        for start in range(0, len(rows), CHUNK_ROWS):
            chunk = rows[start:start + CHUNK_ROWS]
            self.sum += chunk.T @ chunk
        self.rows += len(rows)

    def merged(self, other: Hessian) -> Hessian:
        """One Hessian for a weight shared by two inputs: their samples pooled."""
        merged = Hessian(self.width)
        merged.sum = self.sum + other.sum
        merged.rows = self.rows + other.rows
        return merged

    def matrix(self) -> Any:
        import numpy as np

        if not self.rows:
            return np.eye(self.width)  # nothing observed: GPTQ reduces to rounding to nearest
        return self.sum * (2.0 / self.rows)


@dataclass
class Factor:
    """What GPTQ needs of one Hessian, computed once for every weight reading that input:
    the upper Cholesky factor of the damped ``H^-1`` (float32) and the inputs never seen nonzero."""

    upper: Any
    dead: Any


def factor(hessian: Any, damping: float = DAMPING) -> Factor:
    """``hessian`` ``[K, K]`` (float64, not modified) damped by ``damping`` x its mean diagonal,
    ten times more (up to three times) where that is still not positive definite.

    LAPACK's Cholesky factorization, inverse from it and factorization of that inverse run in
    place on one copy: about two ``K x K`` float64 matrices at once besides ``hessian``, where
    ``numpy.linalg``'s inverse and factor took four (1 GB more for a 5632-wide MLP input)."""
    import numpy as np
    from scipy.linalg import lapack

    if not np.isfinite(hessian).all():
        raise SolverError("the layer input is NaN or infinite on the calibration data")
    diagonal = np.arange(len(hessian))
    dead = hessian[diagonal, diagonal] == 0
    base = hessian[diagonal, diagonal].astype(np.float64)
    base[dead] = 1
    mean = float(np.mean(base))
    for attempt in range(4):
        work = np.array(hessian, dtype=np.float64, order="F")
        work[diagonal, diagonal] = base + damping * 10**attempt * mean
        work, info = lapack.dpotrf(work, lower=0, overwrite_a=1, clean=0)
        if info == 0:
            work, info = lapack.dpotri(work, lower=0, overwrite_c=1)
        if info == 0:
            work, info = lapack.dpotrf(work, lower=0, overwrite_a=1, clean=0)
        if info == 0:
            for row in range(1, len(work)):  # LAPACK leaves the lower triangle as it found it
                work[row, :row] = 0
            return Factor(work.astype(np.float32, order="C"), dead)
        del work
    raise SolverError("the layer input's Hessian is not positive definite even damped")


def gptq(weights: Any, hessian: Factor, group: int, symmetric: bool) -> QuantizedWeight:
    """GPTQ codes of ``weights`` ``[K, N]`` for the factored layer-input Hessian ``hessian``."""
    import numpy as np

    work = np.array(weights, dtype=np.float32)
    work[hessian.dead, :] = 0  # inputs that are always zero: their weights do not matter
    upper = hessian.upper
    rows, columns = work.shape
    codes = np.empty((rows, columns), dtype=np.uint8)
    groups = -(-rows // group)
    scales = np.empty((groups, columns), dtype=np.float32)
    zeros = np.empty((groups, columns), dtype=np.uint8)
    lazy = group * -(-LAZY_ROWS // group)  # whole groups per lazy block
    for start in range(0, rows, lazy):
        stop = min(start + lazy, rows)
        block = work[start:stop]  # a view: updated in place
        errors = np.empty_like(block)
        inverse = upper[start:stop, start:stop]
        for offset in range(stop - start):
            row = start + offset
            if row % group == 0:
                scale, zero = _grid(block[offset:offset + group], symmetric)
                scales[row // group], zeros[row // group] = scale, zero
            weight = block[offset]
            code = np.clip(np.rint(weight / scale) + zero, 0, MAX_CODE)
            codes[row] = code
            error = (weight - (code - zero) * scale) / inverse[offset, offset]
            errors[offset] = error
            block[offset + 1:] -= np.outer(inverse[offset, offset + 1:], error)
        work[stop:] -= upper[start:stop, stop:].T @ errors
    return QuantizedWeight(codes, scales, zeros, group, symmetric)


def _grid(rows: Any, symmetric: bool) -> tuple[Any, Any]:
    """Scale (float32) and zero point (float32 holding an integer) per column of ``rows``."""
    import numpy as np

    low = np.minimum(rows.min(axis=0), 0)
    high = np.maximum(rows.max(axis=0), 0)
    if symmetric:
        high = np.maximum(-low, high)
        low = -high
    empty = high == low
    low, high = np.where(empty, -1, low), np.where(empty, 1, high)
    scale = ((high - low) / MAX_CODE).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1))  # a range too small for float32's scale
    zero = np.full_like(scale, SYMMETRIC_ZERO) if symmetric else np.clip(np.rint(-low / scale), 0, MAX_CODE)
    return scale, zero.astype(np.float32)


def matmul_nbits_tensors(quantized: QuantizedWeight) -> dict[str, Any]:
    """``B`` ``[N, blocks, group/2]``, ``scales`` ``[N, blocks]`` and (asymmetric)
    ``zero_points`` ``[N, ceil(blocks/2)]`` as MatMulNBits and ONNX Runtime's own quantizer lay them out."""
    import numpy as np

    rows, columns = quantized.codes.shape
    blocks = quantized.scales.shape[0]
    padded = np.empty((columns, blocks * quantized.group), dtype=np.uint8)
    padded[:, :rows] = quantized.codes.T
    # Rows past K (a partial last block) decode to zero, as when ONNX Runtime pads with zeros.
    fill = np.full(columns, SYMMETRIC_ZERO, dtype=np.uint8) if quantized.symmetric else quantized.zeros[-1]
    padded[:, rows:] = fill[:, None]
    packed = (padded[:, 0::2] | (padded[:, 1::2] << 4)).reshape(columns, blocks, quantized.group // 2)
    tensors = {"B": packed, "scales": np.ascontiguousarray(quantized.scales.T)}
    if not quantized.symmetric:
        zeros = np.full((columns, blocks + blocks % 2), SYMMETRIC_ZERO, dtype=np.uint8)
        zeros[:, :blocks] = quantized.zeros.T
        tensors["zero_points"] = zeros[:, 0::2] | (zeros[:, 1::2] << 4)
    return tensors
