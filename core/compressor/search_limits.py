"""What bounds a search: its arguments, its wall-clock deadline, and when a trial measured
on the first examples can be stopped without ever refusing a variant that meets the budget.

The deadline (``--time-budget``) stops the trial under way: a ``SIGALRM`` timer raises
:class:`TimeUp` in the main thread, which unwinds the backend's step or the wait for the
measuring process (that process is killed on the way out, as for Ctrl-C). Where no timer
can be set (not the main thread, no ``setitimer``), no trial starts after the deadline.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from compressor.budgets import Budgets, violation
from compressor.errors import UsageError

#: Smallest margin by which the best case must miss the budget (float noise is not a miss).
_CERTAIN = 1e-9
#: Headline figures that are shares of examples, each example counting once (see
#: :mod:`compressor.comparing`); per position, per pixel, F1 and nearest-neighbour figures are not.
EXAMPLE_SHARES = frozenset({"top1_agreement", "decision_agreement", "label_agreement", "exact_match",
                            "box_agreement", "score_agreement"})
#: Tasks of the compared output whose accuracy (top-1 against the labels) is a share of examples.
_ACCURACY_PER_EXAMPLE = frozenset({None, "classifier", "probability"})
#: Tasks of the compared output whose cosine is a mean over examples (one row each).
_COSINE_PER_EXAMPLE = frozenset({None, "classifier", "embedding", "regression"})


class TimeUp(BaseException):
    """The search's time budget ran out during a trial (a BaseException, like Ctrl-C, so that
    no ``except Exception`` in a backend turns it into that trial's failure)."""


def check_limits(max_trials: object, time_budget_seconds: object) -> None:
    """Usage errors (exit 2) for limits that would make no search or never stop it."""
    if isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 1:
        raise UsageError(f"max_trials must be a whole number of at least 1, not {max_trials!r}")
    if time_budget_seconds is not None and (
            isinstance(time_budget_seconds, bool) or not isinstance(time_budget_seconds, (int, float))
            or not math.isfinite(time_budget_seconds) or time_budget_seconds <= 0):
        raise UsageError(f"the time budget must be a positive number of minutes, not {time_budget_seconds!r}")


def can_interrupt() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextmanager
def deadline(at: float | None) -> Iterator[None]:
    """Raise :class:`TimeUp` inside the block once ``time.monotonic()`` reaches ``at``
    (None: no deadline). A timer set by someone else (a test runner's) is put back after."""
    if at is None:
        yield
        return
    if at <= time.monotonic():
        raise TimeUp
    if not can_interrupt():
        yield
        return
    armed = True

    def ring(signum: int, frame: Any) -> None:
        if armed:
            raise TimeUp

    entered = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, ring)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, max(at - entered, 1e-3))
    try:
        yield
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:
            left = previous_delay - (time.monotonic() - entered)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), previous_interval)


def certain_violation(metrics: Mapping[str, Any], seen: int, total: int, base: Mapping[str, Any],
                      budgets: Budgets) -> float:
    """How far outside the budget a variant is on the whole data **at best**, from its
    ``metrics`` on the first ``seen`` of ``total`` examples (0: it may still meet it).

    The best case counts every example not yet seen as agreeing, correct and with cosine
    1, so a variant stopped here cannot meet the budget on the whole data. Only measures
    that are shares of examples are bounded so (:data:`EXAMPLE_SHARES`, top-1 accuracy,
    mean cosine per example with no NaN/Inf rows left out); others (per position, per
    pixel, F1, nearest neighbour) are not, and never stop a trial early."""
    if not 0 < seen < total:
        return 0.0
    unseen = total - seen
    task, headline = metrics.get("task"), metrics.get("headline_metric")
    per_example = {
        "agreement": headline in EXAMPLE_SHARES if headline is not None else "agreement_kind" not in metrics,
        "accuracy": task in _ACCURACY_PER_EXAMPLE,
        "cosine": task in _COSINE_PER_EXAMPLE and not metrics.get("nonfinite"),
    }

    def best_case(value: Any) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return (value * seen + unseen) / total

    bounded: dict[str, Any] = {}
    for key in ("accuracy", "agreement"):
        value = best_case(metrics.get(key)) if per_example[key] else None
        if value is not None:
            bounded[key] = value
    cosine = metrics.get("cosine")
    mean = best_case(cosine.get("mean")) if isinstance(cosine, dict) and per_example["cosine"] else None
    if mean is not None:
        bounded["cosine"] = {"mean": mean}
    if not bounded:
        return 0.0
    margin = violation(bounded, base, budgets)
    return margin if margin > _CERTAIN else 0.0
