"""A variant's latency against the original's, to a stated precision.

In a variant's measuring process, the original's runtime is opened beside the
variant's and the two are timed in interleaved blocks (:func:`interleave`):
a run of calls of one, then a run of the other, the order alternating from block
to block. Each block gives one ratio, the variant's p50 over the original's p50
within the block; the machine's drift (neighbours coming and going on a shared
machine) moves both alike within a block and cancels in its ratio. The figure is
the median of the block ratios, and its 95% interval the distribution-free
interval of a median (order statistics of the block ratios, binomial ranks:
:func:`median_rank_interval`). Blocks are timed until the interval's relative
half-width is within ``settings.precision`` (checked on the 98% interval,
:data:`STOP_CONFIDENCE`; after the floor: ``min_seconds``,
``min_iterations`` calls of each, :data:`MIN_BLOCKS` blocks) or until
``settings.max_seconds`` is spent.

:func:`ratio_fields` turns the measuring processes' figures into a variant's
``latency_ratio`` fields of ``report.json``; where the two were not timed side by
side (``--precision off``, a search's trials), the ratio of the two p50s, with no
interval.
"""

from __future__ import annotations

import bisect
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from compressor.measuring import percentile
from compressor.models import MeasureSettings

#: The confidence of every latency-ratio interval.
CONFIDENCE = 0.95
#: Timing stops when the interval at this confidence is within the precision (the one
#: reported is at :data:`CONFIDENCE`, narrower): looking after every block and stopping at
#: the first narrow enough interval would otherwise cover the ratio less often than 95%
#: (about 93% in simulation; 95% with this margin, at about 1.35 times the blocks).
STOP_CONFIDENCE = 0.98
#: The fewest blocks whose ratios bound a median at 95% (2 x 0.5^6 < 0.05).
MIN_BLOCKS = 6
#: Up to this many blocks the binomial ranks are exact; beyond, the normal approximation.
EXACT_RANKS_UP_TO = 1000
#: Each side's run of calls in a block lasts about this long (at the default
#: ``--min-seconds`` 0.5; shorter with a lower floor): short enough that the machine
#: does not change within a block, long enough to amortize the switch between runtimes.
RUN_SECONDS = 0.025
#: A run of at least this many calls starts with an untimed call: the first call after
#: the other runtime ran finds the caches holding the other model's weights.
UNTIMED_CALL_FROM = 4

#: ``latency_ratio_method``: timed side by side in the variant's measuring process.
INTERLEAVED = "interleaved"
#: ``latency_ratio_method``: the two p50s, measured in separate processes (no interval).
SEPARATE = "separate p50s"


@dataclass(frozen=True)
class RatioInterval:
    """The variant's p50 over the original's, with its interval (None below :data:`MIN_BLOCKS`)."""

    ratio: float
    low: float | None
    high: float | None
    blocks: int

    @property
    def half_width(self) -> float | None:
        """The interval's larger relative distance from the ratio: 0.03 is +-3%."""
        if self.low is None or self.high is None or not self.ratio > 0:
            return None
        return max(self.high / self.ratio - 1.0, 1.0 - self.low / self.ratio)


def median_rank_interval(count: int, confidence: float = CONFIDENCE) -> tuple[int, int] | None:
    """0-based positions ``(low, high)`` in ``count`` sorted values whose values bound their
    median with at least ``confidence`` (each value independently above or below it: a
    binomial count); None where ``count`` values cannot."""
    tail = (1.0 - confidence) / 2.0
    if count > EXACT_RANKS_UP_TO:
        z = NormalDist().inv_cdf(1.0 - tail)
        rank = math.floor(count / 2.0 - z * math.sqrt(count) / 2.0)
        return (rank - 1, count - rank) if rank >= 1 else None
    probability = 0.5 ** count  # P(exactly i values below the median), i = 0
    below = probability
    rank = 0  # the most values that may lie below the interval
    while below <= tail:
        rank += 1
        probability *= (count - rank + 1) / rank
        below += probability
    return (rank - 1, count - rank) if rank >= 1 else None


def ratio_interval(ratios: Sequence[float], confidence: float = CONFIDENCE) -> RatioInterval | None:
    """The median of the blocks' ratios and its interval; None without a ratio."""
    return sorted_ratio_interval(sorted(value for value in ratios if math.isfinite(value) and value > 0),
                                 confidence)


def sorted_ratio_interval(ordered: Sequence[float], confidence: float = CONFIDENCE) -> RatioInterval | None:
    """:func:`ratio_interval` of ratios sorted already (finite, above 0)."""
    if not ordered:
        return None
    ranks = median_rank_interval(len(ordered), confidence)
    median = percentile(ordered, 0.5)
    if ranks is None:
        return RatioInterval(median, None, None, len(ordered))
    return RatioInterval(median, ordered[ranks[0]], ordered[ranks[1]], len(ordered))


def precise_enough(interval: RatioInterval | None, precision: float) -> bool:
    """Whether ``interval`` is within ``precision`` (a relative half-width) of its ratio."""
    width = interval.half_width if interval is not None else None
    return width is not None and width <= precision


def calls_per_run(call_ms: float, settings: MeasureSettings) -> int:
    """How many calls a side's run of a block makes: about :data:`RUN_SECONDS` (a 20th of
    ``min_seconds`` where that is less, at least 2 ms) of them, one at the least."""
    target_ms = min(RUN_SECONDS, max(0.002, settings.min_seconds / 20.0)) * 1000.0
    return max(1, round(target_ms / call_ms)) if call_ms > 0 else 1


def interleave(variant: Callable[[], Any], original: Callable[[], Any], settings: MeasureSettings,
               clock: Callable[[], float] = time.perf_counter,
               rows: tuple[int, int] = (1, 1)) -> dict[str, Any]:
    """Time ``variant()`` against ``original()`` in interleaved blocks until the ratio of their
    p50s is known to ``settings.precision`` or ``settings.max_seconds`` are spent.

    The original is warmed up first (``settings.warmup`` calls; the variant, timed already,
    three); each side's next run is as many calls as :func:`calls_per_run` makes of its last
    p50. ``rows``: the examples one call of each runs (a model exported for a fixed batch), so
    the ratio is per example. Returns the ``latency_ratio`` fields of a variant's metrics (see
    docs/report-format.md)."""
    variant_ms = _warm_up(variant, 3, clock)
    original_ms = _warm_up(original, settings.warmup, clock)
    calls_per_side = [calls_per_run(variant_ms, settings), calls_per_run(original_ms, settings)]
    scale = rows[1] / rows[0]
    ordered: list[float] = []  # the blocks' ratios, kept sorted
    blocks = 0
    calls = [0, 0]
    started = clock()
    longest = 0.0  # seconds of the longest block so far: no block starts that would end past the cap
    met = False
    while True:
        block_started = clock()
        p50s = [0.0, 0.0]
        for side in ((0, 1) if blocks % 2 == 0 else (1, 0)):
            p50s[side] = _run_p50((variant, original)[side], calls_per_side[side], clock)
            calls[side] += calls_per_side[side]
            # The next run's length from this one's p50: one warm-up call tells it poorly.
            calls_per_side[side] = calls_per_run(p50s[side] * 1000.0, settings)
        blocks += 1
        ratio = p50s[0] / p50s[1] * scale if p50s[1] > 0 else math.nan
        if math.isfinite(ratio) and ratio > 0:
            bisect.insort(ordered, ratio)
        longest = max(longest, clock() - block_started)
        elapsed = clock() - started
        floor_met = (blocks >= MIN_BLOCKS and elapsed >= settings.min_seconds
                     and min(calls) >= settings.min_iterations)
        if floor_met and precise_enough(sorted_ratio_interval(ordered, STOP_CONFIDENCE), settings.precision):
            met = True
            break
        if elapsed + longest > settings.max_seconds:
            break
    return _fields(sorted_ratio_interval(ordered), met, blocks, calls, clock() - started)


def _warm_up(call: Callable[[], Any], count: int, clock: Callable[[], float]) -> float:
    """``count`` (at least one) calls that count for no figure; their median milliseconds."""
    times = []
    for _ in range(max(1, count)):
        begin = clock()
        call()
        times.append((clock() - begin) * 1000.0)
    return percentile(sorted(times), 0.5)


def _run_p50(call: Callable[[], Any], count: int, clock: Callable[[], float]) -> float:
    if count >= UNTIMED_CALL_FROM:
        call()
    samples = []
    for _ in range(count):
        begin = clock()
        call()
        samples.append(clock() - begin)
    return percentile(sorted(samples), 0.5)


def _fields(interval: RatioInterval | None, met: bool, blocks: int, calls: Sequence[int],
            seconds: float) -> dict[str, Any]:
    if interval is None:
        return {"latency_ratio_method": INTERLEAVED, "latency_precision_met": False,
                "latency_ratio_blocks": blocks, "latency_ratio_seconds": round(seconds, 3)}
    bounds = {"latency_ratio_low": interval.low, "latency_ratio_high": interval.high,
              "latency_ratio_half_width": interval.half_width}
    return {
        "latency_ratio": interval.ratio,
        **{key: value for key, value in bounds.items() if value is not None},
        "latency_precision_met": met,
        "latency_ratio_method": INTERLEAVED,
        "latency_ratio_blocks": blocks,
        "latency_ratio_calls": list(calls),
        "latency_ratio_seconds": round(seconds, 3),
    }


#: The fields :func:`ratio_fields` takes from one measuring process's metrics.
RATIO_KEYS = ("latency_ratio", "latency_ratio_low", "latency_ratio_high", "latency_ratio_half_width",
              "latency_precision_met", "latency_ratio_method", "latency_ratio_blocks", "latency_ratio_calls",
              "latency_ratio_seconds", "latency_ratio_note")


def ratio_fields(runs: Sequence[Mapping[str, Any]], original: Mapping[str, Any] | None,
                 settings: MeasureSettings) -> tuple[dict[str, Any], list[str]]:
    """A variant's ``latency_ratio`` fields from its measurements (one per repeat) and the
    original's metrics, and the notes the report states (an interval wider than asked).

    Of several repeats timed side by side, the one with the median ratio gives every
    field (an interval is one measurement's, not a median of bounds); ``latency_ratio_repeats``
    lists each repeat's ratio. Without such a measurement the ratio is that of the two p50s
    (the variant's median over its repeats, the original's first measurement's), with no
    interval (``latency_ratio_method`` says which)."""
    side_by_side = [run for run in runs if isinstance(run.get("latency_ratio"), float)]
    notes: list[str] = []
    if side_by_side:
        chosen = sorted(side_by_side, key=lambda run: run["latency_ratio"])[(len(side_by_side) - 1) // 2]
        fields = {key: chosen[key] for key in RATIO_KEYS if key in chosen}
        if len(side_by_side) > 1:
            fields["latency_ratio_repeats"] = [run["latency_ratio"] for run in side_by_side]
        fields["latency_precision"] = settings.precision
        notes += _precision_notes(fields, settings)
        return fields, notes
    fields = {key: runs[0][key] for key in ("latency_ratio_note",) if runs and key in runs[0]}
    p50s = [value for value in map(_p50, runs) if value is not None]
    mine = statistics.median(p50s) if p50s else None
    theirs = _p50(original) if original is not None else None
    if mine is not None and theirs:
        fields.update({"latency_ratio": mine / theirs, "latency_ratio_method": SEPARATE})
    if fields.get("latency_ratio_note"):
        notes.append(f"speed: {fields['latency_ratio_note']}")
    return fields, notes


def _precision_notes(fields: Mapping[str, Any], settings: MeasureSettings) -> list[str]:
    if fields.get("latency_precision_met"):
        return []
    seconds = fields.get("latency_ratio_seconds", 0.0)
    width = fields.get("latency_ratio_half_width")
    asked = f"not the ±{percent_text(settings.precision)} asked (--precision)"
    if width is None:
        return [f"speed: {fields.get('latency_ratio_blocks', 0)} block(s) in {seconds:.0f} s, too few for an "
                f"interval, {asked}; --max-seconds allows longer"]
    calls = min(fields.get("latency_ratio_calls") or [0])
    if width <= settings.precision and calls < settings.min_iterations:
        # Narrow enough, but the cap came before the floor of calls (a call of seconds: a big model).
        return [f"speed: interval ±{percent_text(width)} after {seconds:.0f} s, within the "
                f"±{percent_text(settings.precision)} asked, from {calls} calls of each, fewer than the "
                f"{settings.min_iterations} of the timing's floor; --max-seconds allows longer"]
    return [f"speed: interval ±{percent_text(width)} after {seconds:.0f} s, {asked}; --max-seconds allows "
            "longer, a quieter machine narrows it"]


def percent_text(fraction: float) -> str:
    """``0.023`` as ``2%``, ``0.004`` as ``0.4%``."""
    value = 100.0 * fraction
    return f"{value:.0f}%" if value >= 0.95 else f"{value:.1f}%"


def _p50(metrics: Mapping[str, Any]) -> float | None:
    latency = metrics.get("latency_ms")
    value = latency.get("p50") if isinstance(latency, Mapping) else None
    return value if isinstance(value, float) and math.isfinite(value) and value > 0 else None


#: The widest ``--precision``: +-50%.
MAX_PRECISION = 0.5


def parse_precision(text: str) -> float:
    """``--precision``: a relative half-width from 0 to :data:`MAX_PRECISION`; ``off`` or 0: off."""
    from compressor.errors import UsageError

    if text.strip().lower() in ("off", "0"):
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0.0 <= value <= MAX_PRECISION):
        raise UsageError(f"--precision {text!r}: a fraction of the ratio from 0 to {MAX_PRECISION:g} "
                         "(0.03 for ±3%), or off")
    return value


def parse_max_seconds(text: str) -> float:
    """``--max-seconds``: more than 0, at most an hour."""
    from compressor.errors import UsageError

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0.0 < value <= 3600.0):
        raise UsageError(f"--max-seconds {text!r}: a number of seconds above 0, at most 3600")
    return value
