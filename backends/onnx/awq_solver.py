"""AWQ's numerics on one layer input, in numpy (Lin et al., 2023, "Activation-aware Weight
Quantization"; llm-awq's ``auto_scale`` and ``auto_clip``).

Weights are ONNX's ``[K, N]``: MatMulNBits quantizes blocks of ``group`` consecutive rows
(input channels) of each column. For a layer input ``X`` with per-channel mean magnitude
``m``, AWQ multiplies the weight's rows by ``s = m^alpha`` (normalised by
``sqrt(max(s) min(s))``) before quantizing and divides the input by ``s``: channels that
carry large activations get finer steps inside their blocks. ``alpha`` is searched on a
grid, then each block's range is shrunk (clipping) where that lowers the output error.

Errors are measured on every calibration row at once through ``H`` (the ``X^T X``
accumulator GPTQ fills, up to a constant factor): ``||X W - X Q||^2 = tr(D^T H D)`` with
``D = W - Q``; clipping, decided per block, uses ``H``'s diagonal blocks, as AWQ scores
each group on its own slice of the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compressor_onnx.gptq_solver import Hessian, QuantizedWeight

MAX_CODE = 15
SYMMETRIC_ZERO = 8
#: alpha in 0, 1/20, ..., 1 (llm-awq's grid, with 1 itself).
ALPHA_STEPS = 20
#: Ranges shrunk to 1, 0.95, ..., 0.55 of the block's largest magnitude (llm-awq: max_shrink 0.5).
CLIP_RATIOS = tuple(1 - step / 20 for step in range(10))
#: Output columns scored per weight during the alpha search: columns are quantized
#: independently, so a spread subset estimates the loss at a fraction of the cost.
SEARCH_COLUMNS = 512
#: Columns clipped and rounded at once: the temporaries stay a few times this slice, not the weight.
CHUNK_COLUMNS = 2048
#: Channels whose mean magnitude is below this share of the largest count as this small:
#: a channel never seen active would otherwise get a scale of zero.
MAGNITUDE_FLOOR = 1e-4


class ActivationStatistics(Hessian):
    """A layer input's ``X^T X`` (a :class:`Hessian`) and its mean absolute value per channel."""

    def __init__(self, width: int) -> None:
        import numpy as np

        super().__init__(width)
        self.absolute_sum = np.zeros(width, dtype=np.float64)

    def add(self, activations: Any) -> None:
        import numpy as np

        rows = np.asarray(activations, dtype=np.float32).reshape(-1, self.width)
        super().add(rows)
        self.absolute_sum += np.abs(rows).sum(axis=0, dtype=np.float64)

    def mean_magnitude(self) -> Any:
        return self.absolute_sum / max(self.rows, 1)


@dataclass(frozen=True)
class ScaleChoice:
    """The input scale found for one layer input: ``s`` ``[K]``, its ``alpha``, and the
    calibration loss at ``alpha`` and at 0 (plain rounding)."""

    scale: Any
    alpha: float
    loss: float
    rounding_loss: float


def quantize_blocks(weights: Any, group: int, symmetric: bool, clip: Any = None) -> QuantizedWeight:
    """``weights`` ``[K, N]`` rounded to nearest on MatMulNBits' grid, each block's range
    first shrunk to ``clip`` ``[blocks, N]`` times its largest magnitude where given.

    Asymmetric blocks span ``[min(w, 0), max(w, 0)]`` in 15 steps; symmetric ones put the
    value of largest magnitude on code -8 (as ONNX Runtime's own quantizer does).
    """
    import numpy as np

    rows, columns = weights.shape
    groups = -(-rows // group)
    padded = np.zeros((groups * group, columns), dtype=np.float32)
    padded[:rows] = weights
    blocks = padded.reshape(groups, group, columns)
    if clip is not None:
        bound = (np.abs(blocks).max(axis=1) * clip)[:, None, :]
        blocks = np.clip(blocks, -bound, bound)
    if symmetric:
        high, low = blocks.max(axis=1), blocks.min(axis=1)
        scale = np.where(np.abs(high) > np.abs(low), high, low) / -8.0
        scale = np.where(scale != 0, scale, np.float32(1)).astype(np.float32)
        zero = np.full(scale.shape, SYMMETRIC_ZERO, dtype=np.float32)
        codes = np.clip(np.rint(blocks / scale[:, None, :]), -8, 7) + SYMMETRIC_ZERO
    else:
        low = np.minimum(blocks.min(axis=1), 0)
        high = np.maximum(blocks.max(axis=1), 0)
        scale = ((high - low) / MAX_CODE).astype(np.float32)
        scale = np.where(scale > 0, scale, np.float32(1))
        zero = np.clip(np.rint(-low / scale), 0, MAX_CODE)
        codes = np.clip(np.rint(blocks / scale[:, None, :]) + zero[:, None, :], 0, MAX_CODE)
    codes = codes.reshape(groups * group, columns)[:rows].astype(np.uint8)
    return QuantizedWeight(codes, scale, zero.astype(np.uint8), group, symmetric)


def output_loss(hessian: Any, difference: Any) -> float:
    """``tr(D^T H D)``: the squared output error of a weight error ``D`` over the calibration rows."""
    import numpy as np

    return float(np.sum((hessian @ difference) * difference, dtype=np.float64))


def search_scale(weights: list[Any], hessian: Any, magnitude: Any, group: int, symmetric: bool) -> ScaleChoice:
    """The ``alpha`` (and its scale) whose rounding of ``diag(s) W``, divided back by ``s``,
    gives the least output error summed over ``weights`` (every ``[K, N]`` weight reading
    the input); ``hessian`` ``[K, K]`` and ``magnitude`` ``[K]`` are the input's statistics."""
    import numpy as np

    hessian = np.asarray(hessian, dtype=np.float32)
    sampled = [weight[:, np.unique(np.linspace(0, weight.shape[1] - 1, SEARCH_COLUMNS).astype(int))]
               if weight.shape[1] > SEARCH_COLUMNS else weight for weight in weights]
    magnitude = np.asarray(magnitude, dtype=np.float64)
    largest = float(magnitude.max()) if magnitude.size else 0.0
    ones = np.ones(len(magnitude), dtype=np.float32)
    if not np.isfinite(largest) or largest <= 0:
        loss = _scaled_loss(sampled, hessian, ones, group, symmetric)
        return ScaleChoice(ones, 0.0, loss, loss)
    magnitude = np.maximum(magnitude, largest * MAGNITUDE_FLOOR)
    best: ScaleChoice | None = None
    rounding = 0.0
    for step in range(ALPHA_STEPS + 1):
        alpha = step / ALPHA_STEPS
        scale = magnitude**alpha
        scale = (scale / np.sqrt(scale.max() * scale.min())).astype(np.float32)
        loss = _scaled_loss(sampled, hessian, scale, group, symmetric)
        if step == 0:
            rounding = loss
        if best is None or loss < best.loss:
            best = ScaleChoice(scale, alpha, loss, rounding)
    assert best is not None
    return ScaleChoice(best.scale if best.alpha else ones, best.alpha, best.loss, rounding)


def _scaled_loss(weights: list[Any], hessian: Any, scale: Any, group: int, symmetric: bool) -> float:
    total = 0.0
    for weight in weights:
        restored = quantize_blocks(weight * scale[:, None], group, symmetric).dequantized() / scale[:, None]
        total += output_loss(hessian, weight - restored)
    return total


def search_clip(weights: Any, hessian: Any, group: int, symmetric: bool) -> Any:
    """Per block and column of ``weights`` ``[K, N]``, the share of its largest magnitude
    (from :data:`CLIP_RATIOS`) to clip the block's range to: the one with the least error
    on the block's own slice of the input (``hessian``'s diagonal block)."""
    import numpy as np

    rows, columns = weights.shape
    groups = -(-rows // group)
    padded = np.zeros((groups * group, groups * group), dtype=np.float32)
    padded[:rows, :rows] = hessian
    diagonal = np.stack([padded[g * group:(g + 1) * group, g * group:(g + 1) * group] for g in range(groups)])
    exact = np.zeros((groups * group, columns), dtype=np.float32)
    exact[:rows] = weights
    exact = exact.reshape(groups, group, columns)
    best_loss = np.full((groups, columns), np.inf)
    best_ratio = np.ones((groups, columns), dtype=np.float32)
    for ratio in CLIP_RATIOS:
        clip = np.full((groups, columns), ratio, dtype=np.float32)
        restored = np.zeros((groups * group, columns), dtype=np.float32)
        restored[:rows] = quantize_blocks(weights, group, symmetric, clip).dequantized()
        difference = exact - restored.reshape(groups, group, columns)
        loss = np.sum(np.matmul(diagonal, difference) * difference, axis=1, dtype=np.float64)
        better = loss < best_loss
        best_loss = np.where(better, loss, best_loss)
        best_ratio = np.where(better, np.float32(ratio), best_ratio)
    return best_ratio


def quantize_clipped(weights: Any, hessian: Any, group: int, symmetric: bool) -> QuantizedWeight:
    """``weights`` ``[K, N]`` rounded with each block's range clipped as :func:`search_clip`
    decides, :data:`CHUNK_COLUMNS` columns at a time (columns are independent)."""
    import numpy as np

    hessian = np.asarray(hessian, dtype=np.float32)
    parts = []
    for start in range(0, weights.shape[1], CHUNK_COLUMNS):
        chunk = np.asarray(weights[:, start:start + CHUNK_COLUMNS], dtype=np.float32)
        parts.append(quantize_blocks(chunk, group, symmetric, search_clip(chunk, hessian, group, symmetric)))
    return QuantizedWeight(np.concatenate([part.codes for part in parts], axis=1),
                           np.concatenate([part.scales for part in parts], axis=1),
                           np.concatenate([part.zeros for part in parts], axis=1), group, symmetric)
