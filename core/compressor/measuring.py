"""Timing helpers for measurers, so every backend times the same way.

A backend's ``compressor_measure`` uses :class:`Stopwatch` for load time and
:func:`time_calls` for latency: warmup calls first, then timed calls until both
``settings.min_iterations`` and ``settings.min_seconds`` are reached.
:func:`time_batch` times a batch within a budget of seconds.
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
#: The batch timing (its cold call, warm-up and timed calls) stays within this many
#: seconds unless ``--set batch_seconds=S`` says otherwise: a batch of 32 of a big
#: model can take minutes a call.
BATCH_BUDGET_SECONDS = 30.0
#: The calls a batch timing needs at the least: the cold call, one warm-up, three timed.
BATCH_PLANNED_CALLS = 5
MIN_TIMED_CALLS = 3
#: Timed batch calls made at the least when ``--min-seconds`` allows no fewer: a batch call
#: runs many examples, so a few give its p50 (30, batch 1's floor, took 25 s of MiniLM's
#: 39 s of measuring at batch 32).
MIN_BATCH_CALLS = 5
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


def batch_budget_seconds(settings: MeasureSettings) -> float:
    value = settings.options.get("batch_seconds")
    return float(value) if value is not None else BATCH_BUDGET_SECONDS


def rows_within(size: int, row_ms: float, budget_ms: float) -> int:
    """The most rows, ``size`` or else a power of two below it, whose planned calls
    (:data:`BATCH_PLANNED_CALLS`) fit ``budget_ms`` at ``row_ms`` a row (batching
    rarely costs more a row than batch 1 does); 0 when not even two rows fit."""
    fitting = budget_ms / (BATCH_PLANNED_CALLS * row_ms) if row_ms > 0 else math.inf
    if fitting >= size:
        return size
    return 0 if fitting < 2 else 1 << int(math.log2(fitting))


def time_batch(call_at: Callable[[int], Callable[[], Any]], settings: MeasureSettings,
               row_ms: float) -> dict[str, Any]:
    """Throughput at ``settings.batch_size`` within :func:`batch_budget_seconds`.

    ``call_at(rows)`` returns a call that runs one batch of ``rows``; ``row_ms`` is the
    batch-1 latency. Where the planned calls at the full batch would not fit the
    budget, fewer rows are timed (``batch_size`` says how many, ``batch_note`` why),
    or none. The first call at the chosen rows is the cold call (``first_call_ms``);
    a runtime that refuses it (a model exported for one batch size) leaves only a
    ``batch_note``. Returns the metrics: ``latency_batch_ms``, ``batch_size``,
    ``batch_note`` where there is something to say."""
    from compressor.errors import first_line

    size = max(1, settings.batch_size)
    budget_s = batch_budget_seconds(settings)
    started = time.perf_counter()
    how = f"the batch timing's budget of {budget_s:g} s (--set batch_seconds=S)"
    rows = rows_within(size, row_ms, budget_s * 1000.0)
    why = (f"at {row_ms:.3g} ms an example, {BATCH_PLANNED_CALLS} calls of {size} would take about "
           f"{BATCH_PLANNED_CALLS * size * row_ms / 1000.0:.3g} s, over {how}")
    if rows == 0:
        return {"batch_note": f"not timed at batch {size}{' nor 2' if size > 2 else ''}: {why}"}
    call = call_at(rows)
    try:
        _, first_ms = time_first_call(call)
    except Exception as error:  # noqa: BLE001 - a model exported for one batch size refuses others
        return {"batch_note": f"not timed at batch {rows}: {first_line(error, 120)}"}
    if rows < size:
        # Batched rows cost less than batch 1's: the cold call says whether more fit.
        left_ms = (budget_s - (time.perf_counter() - started)) * 1000.0
        more = rows_within(size, first_ms / rows, left_ms)
        if more > rows:
            rows, call = more, call_at(more)
            _, first_ms = time_first_call(call)
    samples = _time_within(call, settings, started + budget_s, first_ms)
    metrics: dict[str, Any] = {
        "latency_batch_ms": {**summarize_ms(samples, rows), "first_call_ms": first_ms},
        "batch_size": rows,
    }
    if rows < size:
        metrics["batch_note"] = f"timed at batch {rows}, not {size}: {why}"
    elif len(samples) < MIN_TIMED_CALLS:
        metrics["batch_note"] = f"{len(samples)} timed call(s) at batch {rows}: {how} was spent"
    return metrics


def _time_within(call: Callable[[], Any], settings: MeasureSettings, deadline: float,
                 call_ms: float) -> list[float]:
    """Warm-up, then timed calls as :func:`time_calls` makes them, but no call started that
    would end past ``deadline`` (``time.perf_counter()``) once one call is timed.
    ``call_ms`` is the cold call's time: a warm-up is made only where it and
    :data:`MIN_TIMED_CALLS` more calls fit."""
    for _ in range(min(settings.warmup - 1, 1)):  # the cold call was one; one more warms the batch
        if time.perf_counter() + (1 + MIN_TIMED_CALLS) * call_ms / 1000.0 > deadline:
            break
        with Stopwatch() as watch:
            call()
        call_ms = watch.ms
    samples: list[float] = []
    started = time.perf_counter()
    while True:
        begin = time.perf_counter()
        call()
        end = time.perf_counter()
        samples.append((end - begin) * 1000.0)
        elapsed = end - started
        if len(samples) >= min(settings.min_iterations, MIN_BATCH_CALLS) and elapsed >= settings.min_seconds:
            break
        if elapsed >= MAX_TIMING_SECONDS and len(samples) >= MIN_TIMED_CALLS:
            break
        if end + (end - begin) > deadline:
            break
    return samples
