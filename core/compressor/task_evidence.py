"""What an output's values show about what it is, for :mod:`compressor.tasks`: the
range of its values, the axis along which they are probabilities (softmax) or
log-probabilities, unit-length vectors, a class that wins most positions (a CTC
blank), box-like columns, an anchor head's layout.

Every function reads at most :data:`SAMPLED_EXAMPLES` examples (fewer when they
are large) and ignores examples holding NaN or Inf. Axes are axes of the stacked array (batch first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Evidence is read from this many examples at most (the first ones)...
SAMPLED_EXAMPLES = 64
#: ...and from at most about this many numbers (a language model's logits are large).
SAMPLED_VALUES = 2_000_000
#: How far from 1 a sum of probabilities may be (quantized softmax outputs are coarse).
SUM_TOLERANCE = 0.03
#: How far outside [0, 1] a probability may be (fp16 and int8 rounding).
RANGE_TOLERANCE = 1e-3
#: Share of rows that must satisfy a test (a few odd rows do not decide).
MOST = 0.99


@dataclass(frozen=True)
class Look:
    """Facts of one output's values; ``shape`` is one example's."""

    shape: tuple[int, ...]
    low: float | None
    high: float | None
    #: Axes (of the stacked array) along which every row sums to 1 with values in [0, 1].
    softmax_axes: tuple[int, ...] = ()
    #: Axes along which ``logsumexp`` is 0 with values <= 0 (log-softmax).
    log_softmax_axes: tuple[int, ...] = ()
    #: One vector per example, each of length 1.
    unit_norm: bool = False

    @property
    def probabilities(self) -> bool:
        """Every finite value in [0, 1]."""
        return (self.low is not None and self.high is not None
                and self.low >= -RANGE_TOLERANCE and self.high <= 1 + RANGE_TOLERANCE)

    @property
    def shown(self) -> str:
        return "[" + ", ".join(["N", *(str(size) for size in self.shape)]) + "]"

    def range_text(self) -> str:
        if self.low is None or self.high is None:
            return "no finite values"
        return f"values from {self.low:.3g} to {self.high:.3g}"


def finite_sample(values: Any) -> Any:
    """The first examples of ``values`` (float64), leaving out those with NaN or Inf."""
    import numpy as np

    values = np.asarray(values)
    if values.ndim == 0 or not len(values):
        return values.astype(np.float64)
    per_example = max(1, int(np.prod(values.shape[1:])))
    sample = np.asarray(values[:max(1, min(SAMPLED_EXAMPLES, SAMPLED_VALUES // per_example))], dtype=np.float64)
    finite = np.isfinite(sample.reshape(len(sample), -1)).all(axis=1)
    return sample[finite]


def look(values: Any) -> Look:
    import numpy as np

    shape = tuple(int(size) for size in np.shape(values)[1:])
    sample = finite_sample(values)
    if not sample.size:
        return Look(shape, None, None)
    low, high = float(sample.min()), float(sample.max())
    softmax, log_softmax = [], []
    for axis in range(1, sample.ndim):
        if sample.shape[axis] < 2:
            continue
        if low >= -RANGE_TOLERANCE and high <= 1 + RANGE_TOLERANCE:
            if _mostly(np.abs(sample.sum(axis=axis) - 1) <= SUM_TOLERANCE):
                softmax.append(axis)
        elif high <= RANGE_TOLERANCE:
            top = sample.max(axis=axis, keepdims=True)
            total = np.log(np.exp(sample - top).sum(axis=axis)) + np.squeeze(top, axis=axis)
            if _mostly(np.abs(total) <= SUM_TOLERANCE):
                log_softmax.append(axis)
    unit = False
    if sample.ndim == 2 and sample.shape[1] >= 8:
        unit = _mostly(np.abs(np.linalg.norm(sample, axis=1) - 1) <= 1e-2)
    return Look(shape, low, high, tuple(softmax), tuple(log_softmax), unit)


def _mostly(flags: Any) -> bool:
    import numpy as np

    flags = np.asarray(flags)
    return bool(flags.size) and float(flags.mean()) >= MOST


def dominant_class(values: Any, class_axis: int) -> tuple[int, float]:
    """The class that wins most positions along ``class_axis`` (all other axes but
    the batch are positions), and the share of positions it wins."""
    import numpy as np

    sample = finite_sample(values)
    if not sample.size:
        return 0, 0.0
    winners = sample.argmax(axis=class_axis).ravel()
    counts = np.bincount(winners, minlength=sample.shape[class_axis])
    top = int(counts.argmax())
    return top, float(counts[top] / max(1, winners.size))


def box_form(boxes: Any) -> str | None:
    """``"xyxy"`` when the last axis holds corners (x2 >= x1 and y2 >= y1 for nearly every
    box), ``"cxcywh"`` when it holds centres and sizes (sizes >= 0), None for neither
    (anchor offsets, not boxes yet)."""
    import numpy as np

    sample = finite_sample(boxes)
    if not sample.size or sample.shape[-1] != 4:
        return None
    corners = (sample[..., 2] >= sample[..., 0]) & (sample[..., 3] >= sample[..., 1])
    if _mostly(corners) and np.ptp(sample) > 0:
        return "xyxy"
    if _mostly(sample[..., 2:] >= 0):
        return "cxcywh"
    return None


def anchor_head(values: Any, look_: Look) -> int | None:
    """The axis holding ``4 + classes`` numbers of an anchor head (YOLO ``[N, 4+C, A]`` or
    ``[N, A, 4+C]``): box centre and size in pixels first (some above 1.5, sizes >= 0),
    then class scores in [0, 1], over many more anchors than numbers. None otherwise."""
    import numpy as np

    if len(look_.shape) != 2:
        return None
    small = 1 if look_.shape[0] <= look_.shape[1] else 2
    numbers, anchors = look_.shape[small - 1], look_.shape[2 - small]
    if numbers < 5 or anchors < max(64, 2 * numbers):
        return None
    sample = finite_sample(values)
    if not sample.size:
        return None
    rows = np.moveaxis(sample, small, 1)
    coords, scores = rows[:, :4], rows[:, 4:]
    sizes_positive = _mostly(coords[:, 2:] >= 0)
    pixel_coords = float(coords.max()) > 1.5
    scores_probabilities = float(scores.min()) >= -RANGE_TOLERANCE and float(scores.max()) <= 1 + RANGE_TOLERANCE
    return small if sizes_positive and pixel_coords and scores_probabilities else None
