"""Timing helpers every backend shares, and how the report shows a noisy machine."""

from __future__ import annotations

import time
from statistics import fmean, pstdev

import pytest

from compressor import MeasureSettings, time_calls
from compressor.html_report import render_html
from compressor.measuring import percentile, summarize_ms, window_p50s, window_statistics
from compressor.report import Report, VariantResult, render_table


def test_time_calls_reaches_both_minimums_and_keeps_the_first_call_apart() -> None:
    calls = []

    def call() -> None:
        calls.append(None)
        time.sleep(0.05 if len(calls) == 1 else 0.001)

    latency = time_calls(call, MeasureSettings(warmup=2, min_iterations=40, min_seconds=0.1))
    assert latency["iterations"] >= 40 and len(calls) == latency["iterations"] + 2
    assert latency["first_call_ms"] >= 50 > latency["p99"]
    assert 1.0 <= latency["p50"] <= latency["p90"] <= latency["p99"] < 50


def test_percentile_interpolates() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == pytest.approx(2.5)
    assert percentile([5.0], 0.99) == 5.0


def test_windows_show_how_p50_moved_while_timing() -> None:
    assert window_statistics([2.0] * 600) == {"p50_spread": 0.0, "p50_fastest_window": 2.0}
    # 1.8 s of calls: 18 windows of 6 calls, the first 10 at 10 ms and the last 8 at 20 ms
    shifted = [10.0] * 60 + [20.0] * 60
    medians = [10.0] * 10 + [20.0] * 8
    assert window_p50s(shifted) == medians
    statistics_of_shift = window_statistics(shifted)
    assert statistics_of_shift["p50_spread"] == pytest.approx(pstdev(medians) / fmean(medians))
    assert statistics_of_shift["p50_fastest_window"] == 10.0
    assert window_statistics([1.0] * 14) == {}
    assert "p50_spread" not in summarize_ms([1.0] * 5)


def _report(spread: float) -> Report:
    latency = {"p50": 1.0, "p99": 1.2, "p50_spread": spread}
    return Report(model="m", backend="toy", created="now",
                  variants=[VariantResult(name="original", steps=[], metrics={"latency_ms": latency})])


def test_report_says_when_latency_was_measured_on_a_noisy_machine() -> None:
    assert "noisy" not in render_table(_report(0.01)) and "moved" not in render_table(_report(0.01))
    assert "p50 moved by up to 12% between timing windows" in render_table(_report(0.12))
    assert "p50 moved by up to 12%" in render_html(_report(0.12))
    assert "p50 moved" not in render_html(_report(0.01))
