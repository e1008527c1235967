"""Timing helpers for measurers, so every backend times the same way.

A backend's ``compressor_measure`` uses :class:`Stopwatch` for load time and
:func:`time_calls` for latency: warmup calls first, then timed calls until both
``settings.min_iterations`` and ``settings.min_seconds`` are reached.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from compressor.models import MeasureSettings

#: A timed loop stops here even if the minimum count is not reached (slow models).
MAX_TIMING_SECONDS = 20.0
#: Timed calls are grouped into consecutive windows of about this many seconds
#: (and at least MIN_WINDOW_CALLS calls) to see how p50 moved while timing.
WINDOW_SECONDS = 0.1
MIN_WINDOW_CALLS = 5


class Stopwatch:
    """``with Stopwatch() as load: ...`` then ``load.ms``."""

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        self.ms = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.ms = (time.perf_counter() - self._start) * 1000.0


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Linear-interpolated percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    position = (len(sorted_values) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarize_ms(samples_ms: Sequence[float], items_per_call: int = 1) -> dict[str, float]:
    ordered = sorted(samples_ms)
    mean = sum(ordered) / len(ordered) if ordered else math.nan
    return {
        "p50": percentile(ordered, 0.50),
        "p90": percentile(ordered, 0.90),
        "p99": percentile(ordered, 0.99),
        "mean": mean,
        "iterations": len(ordered),
        "throughput_per_s": items_per_call * 1000.0 / mean if mean and mean > 0 else math.nan,
        **window_statistics(samples_ms),
    }


def window_p50s(samples_ms: Sequence[float]) -> list[float]:
    """p50 of each consecutive window of about :data:`WINDOW_SECONDS` of calls."""
    timed_seconds = sum(samples_ms) / 1000.0
    count = min(len(samples_ms) // MIN_WINDOW_CALLS, max(1, round(timed_seconds / WINDOW_SECONDS)))
    if count < 1:
        return []
    size = len(samples_ms) // count
    return [percentile(sorted(samples_ms[i * size : (i + 1) * size]), 0.5) for i in range(count)]


def window_statistics(samples_ms: Sequence[float]) -> dict[str, float]:
    """How p50 moved between timing windows; empty below three windows.

    ``p50_spread`` is the coefficient of variation of the windows' p50s: a few
    percent on a quiet machine, far more on a shared VM whose neighbours come
    and go. ``p50_fastest_window`` is the lowest window p50: the latency with
    the least interference, steadier from run to run than p50 on such a machine.
    """
    medians = window_p50s(samples_ms)
    mean = statistics.fmean(medians) if len(medians) >= 3 else 0.0
    if mean <= 0:
        return {}
    return {"p50_spread": statistics.pstdev(medians) / mean, "p50_fastest_window": min(medians)}


def time_calls(
    call: Callable[[], Any], settings: MeasureSettings, items_per_call: int = 1
) -> dict[str, float]:
    """Latency statistics in milliseconds for ``call()``.

    Returns ``{"p50", "p90", "p99", "mean", "iterations", "throughput_per_s",
    "first_call_ms"}`` plus, from three timing windows on, ``"p50_spread"`` and
    ``"p50_fastest_window"`` (:func:`window_statistics`). ``first_call_ms`` is the
    first (cold) call, kept out of the percentiles: right after loading, it is
    the first inference.
    """
    _, first_call_ms = time_first_call(call)
    for _ in range(settings.warmup - 1):
        call()
    samples: list[float] = []
    started = time.perf_counter()
    while True:
        begin = time.perf_counter()
        call()
        end = time.perf_counter()
        samples.append((end - begin) * 1000.0)
        elapsed = end - started
        if len(samples) >= settings.min_iterations and elapsed >= settings.min_seconds:
            break
        if elapsed >= MAX_TIMING_SECONDS and len(samples) >= 3:
            break
    return {**summarize_ms(samples, items_per_call), "first_call_ms": first_call_ms}


def time_first_call(call: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``call`` once and return its result and the time in ms (first inference)."""
    with Stopwatch() as watch:
        result = call()
    return result, watch.ms
