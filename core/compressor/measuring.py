"""Timing helpers for measurers, so every backend times the same way.

A backend's ``compressor_measure`` uses :class:`Stopwatch` for load time and
:func:`time_calls` for latency: warmup calls first, then timed calls until both
``settings.min_iterations`` and ``settings.min_seconds`` are reached.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from compressor.models import MeasureSettings

#: A timed loop stops here even if the minimum count is not reached (slow models).
MAX_TIMING_SECONDS = 20.0


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
    }


def time_calls(
    call: Callable[[], Any], settings: MeasureSettings, items_per_call: int = 1
) -> dict[str, float]:
    """Latency statistics in milliseconds for ``call()``.

    Returns ``{"p50", "p90", "p99", "mean", "iterations", "throughput_per_s",
    "first_call_ms"}``; ``first_call_ms`` is the first (cold) call, kept out of
    the percentiles: right after loading, it is the first inference.
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
