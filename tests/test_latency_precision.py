"""Latency measured to a stated precision: the interval maths on synthetic timings, the stop
rule on a simulated clock, the report's fields and table on real runs, and ``--precision``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from compressor.cli import cli
from compressor.latency_interval import (
    INTERLEAVED,
    MIN_BLOCKS,
    SEPARATE,
    interleave,
    median_rank_interval,
    percent_text,
    ratio_fields,
    ratio_interval,
)
from compressor.models import MeasureSettings
from compressor.report import Report, VariantResult, render_markdown, render_table
from compressor.report_text import speed_cell


def _block_ratios(true_ratio: float, blocks: int, noise: float, seed: int) -> list[float]:
    """Per-block p50 ratios of a variant ``true_ratio`` times the original's latency, both
    drifting with the machine (a shared factor per block) and noisy on their own."""
    rng = np.random.default_rng(seed)
    drift = np.exp(rng.normal(0, 0.3, blocks))  # the machine: cancels within a block
    original = 10.0 * drift * np.exp(rng.normal(0, noise, blocks))
    variant = 10.0 * true_ratio * drift * np.exp(rng.normal(0, noise, blocks))
    return list(variant / original)


def test_the_ranks_bound_a_median_at_95_percent() -> None:
    assert median_rank_interval(MIN_BLOCKS - 1) is None  # 2 x 0.5^5 > 0.05: no interval from 5 values
    assert median_rank_interval(MIN_BLOCKS) == (0, MIN_BLOCKS - 1)
    for count in (6, 20, 101, 1000):
        low, high = median_rank_interval(count)
        below = sum(math.comb(count, i) for i in range(low + 1)) / 2 ** count  # P(low-th value above the median)
        assert below <= 0.025 < below + math.comb(count, low + 1) / 2 ** count
        assert high == count - 1 - low
    low, high = median_rank_interval(10_000)  # the normal approximation: 1.96 sd of a binomial
    assert low == math.floor(5000 - 1.96 * 50) - 1 and high == 10_000 - 1 - low


def test_a_known_ratio_lies_inside_its_interval_and_noise_widens_it() -> None:
    covered = 0
    for seed in range(200):
        interval = ratio_interval(_block_ratios(0.43, 60, 0.05, seed))
        covered += interval.low <= 0.43 <= interval.high
    assert covered >= 186  # 95% coverage: 190 expected of 200, 186 well within chance
    quiet = ratio_interval(_block_ratios(0.43, 60, 0.02, 1))
    noisy = ratio_interval(_block_ratios(0.43, 60, 0.20, 1))
    assert quiet.half_width < 0.015 < 0.05 < noisy.half_width
    assert quiet.low <= quiet.ratio <= quiet.high
    assert ratio_interval(_block_ratios(0.43, MIN_BLOCKS - 1, 0.02, 1)).half_width is None


class _SimulatedCalls:
    """Two "runtimes" whose calls advance a simulated clock: the variant takes ``ratio`` times
    the original's time, with per-call noise and a machine that slows down half-way."""

    def __init__(self, ratio: float, noise: float, seed: int = 3) -> None:
        self.now, self.calls = 0.0, 0
        self.rng = np.random.default_rng(seed)
        self.ratio, self.noise = ratio, noise

    def clock(self) -> float:
        return self.now

    def call(self, factor: float) -> Callable[[], None]:
        def run() -> None:
            self.calls += 1
            busy = 2.0 if self.now > 1.0 else 1.0
            self.now += 0.004 * factor * busy * math.exp(self.rng.normal(0, self.noise))
        return run


def _interleave(ratio: float, noise: float, seed: int = 3, **settings: float) -> dict:
    simulated = _SimulatedCalls(ratio, noise, seed)
    chosen = MeasureSettings(**{"warmup": 2, "min_iterations": 5, "min_seconds": 0.05, "precision": 0.03,
                                "max_seconds": 30.0, **settings})
    return interleave(simulated.call(ratio), simulated.call(1.0), chosen, clock=simulated.clock)


def test_the_stop_rule_stops_once_the_interval_is_within_the_precision() -> None:
    found = _interleave(0.5, 0.05)
    assert found["latency_ratio_method"] == INTERLEAVED and found["latency_precision_met"] is True
    assert found["latency_ratio_low"] <= found["latency_ratio"] <= found["latency_ratio_high"]
    assert found["latency_ratio_half_width"] <= 0.03
    # Stopping at the first narrow enough interval still covers the true ratio 95% of the time.
    measured = [_interleave(0.5, 0.05, seed) for seed in range(100)]
    assert all(one["latency_precision_met"] for one in measured)
    assert sum(one["latency_ratio_low"] <= 0.5 <= one["latency_ratio_high"] for one in measured) >= 89
    blocks = found["latency_ratio_blocks"]
    assert blocks >= MIN_BLOCKS and found["latency_ratio_seconds"] >= 0.05
    # One block fewer was not enough: the rule stopped at the first block that met it.
    again = _interleave(0.5, 0.05, max_seconds=found["latency_ratio_seconds"] * (blocks - 1.5) / blocks)
    assert again["latency_ratio_blocks"] < blocks and again["latency_precision_met"] is False
    # A tighter precision takes more blocks, a floor raised by --min-seconds is kept.
    assert _interleave(0.5, 0.05, precision=0.01)["latency_ratio_blocks"] > blocks
    assert _interleave(0.5, 0.05, min_seconds=2.0)["latency_ratio_seconds"] >= 2.0


def test_the_cap_stops_a_noisy_measurement_and_the_report_says_so() -> None:
    found = _interleave(0.5, 0.6, max_seconds=0.5)
    # No block starts that would end past the cap at the pace of the longest block so far.
    assert found["latency_precision_met"] is False and found["latency_ratio_seconds"] <= 0.5
    assert found["latency_ratio_half_width"] > 0.03
    fields, notes = ratio_fields([found], {"latency_ms": {"p50": 4.0}}, MeasureSettings(max_seconds=0.5))
    assert fields["latency_precision"] == 0.03
    width = round(100 * found["latency_ratio_half_width"])
    assert notes == [f"speed: interval ±{width}% after 0 s, not the ±3% asked (--precision); --max-seconds "
                     "allows longer, a quieter machine narrows it"]


def test_a_narrow_interval_stopped_before_the_floor_of_calls_says_so() -> None:
    """A big model's call takes seconds: the cap comes before the floor of calls, with an
    interval already narrower than asked (a 4.4 GB Llama: +-0.9% from 16 calls in 58 s)."""
    found = _interleave(0.5, 0.01, min_iterations=1000, max_seconds=2.0)
    assert found["latency_precision_met"] is False and found["latency_ratio_half_width"] <= 0.03
    calls = min(found["latency_ratio_calls"])
    assert calls < 1000
    settings = MeasureSettings(min_iterations=1000, max_seconds=2.0)
    _, notes = ratio_fields([found], {"latency_ms": {"p50": 4.0}}, settings)
    shown = percent_text(found["latency_ratio_half_width"])
    assert notes == [f"speed: interval ±{shown} after 2 s, within the ±3% asked, from {calls} calls of each, "
                     "fewer than the 1000 of the timing's floor; --max-seconds allows longer"]


def test_without_a_side_by_side_timing_the_ratio_is_that_of_the_p50s() -> None:
    fields, notes = ratio_fields([{"latency_ms": {"p50": 2.0}}], {"latency_ms": {"p50": 4.0}}, MeasureSettings())
    assert fields == {"latency_ratio": 0.5, "latency_ratio_method": SEPARATE} and notes == []
    assert speed_cell(fields) == "2.00x"
    # Of repeats, the median repeat gives every field: an interval is one measurement's.
    runs = [{"latency_ratio": r, "latency_ratio_low": r - 0.01, "latency_ratio_high": r + 0.01,
             "latency_ratio_half_width": 0.01 / r, "latency_precision_met": True} for r in (0.52, 0.40, 0.50)]
    fields, _ = ratio_fields(runs, None, MeasureSettings())
    assert fields["latency_ratio"] == 0.50 and fields["latency_ratio_low"] == 0.49
    assert fields["latency_ratio_repeats"] == [0.52, 0.40, 0.50]


def _run(toy_model: dict[str, Path], out: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["run", str(toy_model["model"]), "-q", "fp16", "--data",
                                      str(toy_model["eval"]), "--out", str(out), "--min-seconds", "0",
                                      "--max-seconds", "5", *extra])
    return result.exit_code, result.output


def test_a_run_reports_each_ratio_with_its_interval_and_repeats_only_time(
        toy_host: object, toy_model: dict[str, Path], tmp_path: Path) -> None:
    from dataclasses import replace

    from compressor.evaluation import measure_one
    from compressor.models import Artifact, TensorSpec

    code, output = _run(toy_model, tmp_path / "out", "--precision", "0.2")
    assert code == 0, output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["precision"] == 0.2 and report["settings"]["max_seconds"] == 5.0
    original, fp16 = report["variants"]
    assert "latency_ratio" not in original["metrics"]
    metrics = fp16["metrics"]
    assert metrics["latency_ratio_method"] == INTERLEAVED
    assert metrics["latency_ratio_low"] <= metrics["latency_ratio"] <= metrics["latency_ratio_high"]
    assert metrics["latency_ratio_blocks"] >= MIN_BLOCKS and metrics["latency_precision"] == 0.2
    assert metrics["accuracy"] > 0.9
    met = metrics["latency_precision_met"]
    assert met == (metrics["latency_ratio_half_width"] <= 0.2)
    cell = speed_cell(metrics)
    assert cell.startswith(f"{1 / metrics['latency_ratio']:.2f}x ±") and cell.endswith("%")
    header, _, fp16_line = (line for line in output.splitlines()[:4] if line and not line.startswith("--"))
    assert "speed" in header.split() and cell in fp16_line
    assert "speed: the original's p50 / the variant's (batch 1); ±: half-width of its 95% interval" in output
    assert cell in (tmp_path / "out" / "report.md").read_text()
    assert cell in (tmp_path / "out" / "report.html").read_text()
    assert ("not the ±20% asked" in output) != met
    noisy = Report("m", "toy", "now", [VariantResult("original", [], metrics={"latency_ms": {"p50_spread": 0.2}}),
                                       VariantResult("fp16", ["quantize fp16"], metrics=metrics)])
    assert "; the speed column was timed side by side, which cancels such moves" in render_table(noisy)
    # What a repeat's measuring process does (--repeats): the timings, against the original too,
    # and nothing else (which repeat's ratio is reported: test_without_a_side_by_side_timing...).
    settings = replace(MeasureSettings(min_seconds=0.0, max_seconds=2.0, precision=0.2), timing_only=True)
    artifact, first = (Artifact("toy", tmp_path / "out" / f"{name}.toy", "toy") for name in ("fp16", "original"))
    repeat = measure_one(toy_host, artifact, toy_model["eval"], (TensorSpec("x", (None, 16), "float32"),),
                         settings, first)
    assert repeat.metrics["latency_ms"]["p50"] > 0 and repeat.metrics["latency_ratio"] > 0
    assert "latency_batch_ms" in repeat.metrics and repeat.kept == {} and repeat.output_info == {}
    for once in ("load_ms", "peak_rss_bytes", "measure_peak_rss_bytes", "size_bytes", "eval_batch"):
        assert once not in repeat.metrics, once


def test_precision_off_keeps_the_timing_and_shows_the_ratio_of_p50s(toy_host: object, toy_model: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    code, output = _run(toy_model, tmp_path / "out", "--precision", "off")
    assert code == 0, output
    metrics = json.loads((tmp_path / "out" / "report.json").read_text())["variants"][1]["metrics"]
    assert metrics["latency_ratio_method"] == SEPARATE and "latency_ratio_low" not in metrics
    assert metrics["latency_ratio"] == pytest.approx(metrics["latency_ms"]["p50"] / json.loads(
        (tmp_path / "out" / "report.json").read_text())["variants"][0]["metrics"]["latency_ms"]["p50"])
    assert "±" not in output.split("\n\n")[0]


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--precision", "abc", "error: --precision 'abc': a fraction of the ratio from 0 to 0.5 (0.03 for ±3%), or off"),
    ("--precision", "-0.1", "error: --precision '-0.1': a fraction of the ratio from 0 to 0.5 (0.03 for ±3%), or off"),
    ("--precision", "nan", "error: --precision 'nan': a fraction of the ratio from 0 to 0.5 (0.03 for ±3%), or off"),
    ("--max-seconds", "0", "error: --max-seconds '0': a number of seconds above 0, at most 3600"),
])
def test_a_bad_precision_is_one_line_and_exit_2(option: str, value: str, message: str, tmp_path: Path) -> None:
    model = tmp_path / "model.toy"
    model.write_text("{}")
    result = CliRunner().invoke(cli, ["run", str(model), "-q", "fp16", "--out", str(tmp_path / "out"),
                                      option, value])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [message]
    assert not (tmp_path / "out").exists()


def test_a_report_without_side_by_side_timing_renders_as_before() -> None:
    variants = [VariantResult("original", [], metrics={"latency_ms": {"p50": 4.0, "p99": 5.0}}),
                VariantResult("int8", ["quantize int8"], metrics={"latency_ms": {"p50": 2.0, "p99": 2.5}})]
    report = Report("m.onnx", "onnx", "now", variants)
    assert speed_cell(variants[1].metrics) == "-" and "speed:" not in render_table(report)
    assert "| - |" in render_markdown(report)


def test_too_few_blocks_within_the_cap_give_a_ratio_without_an_interval() -> None:
    found = _interleave(0.5, 0.05, max_seconds=0.02)  # 12 ms a block: one block fits
    assert found["latency_ratio_blocks"] < MIN_BLOCKS and found["latency_precision_met"] is False
    assert "latency_ratio_low" not in found and found["latency_ratio"] > 0
    fields, notes = ratio_fields([found], None, MeasureSettings(max_seconds=0.02))
    assert speed_cell(fields) == f"{1 / found['latency_ratio']:.2f}x"
    assert notes[0].startswith(f"speed: {found['latency_ratio_blocks']} block(s) in 0 s, too few for an interval")


def test_the_python_api_takes_the_precision_and_refuses_a_bad_one(tmp_path) -> None:
    import compressor
    from compressor.errors import UsageError

    for bad in ({"precision": 2.0}, {"precision": -0.1}, {"max_seconds": 0}):
        with pytest.raises(UsageError, match="precision|max-seconds"):
            compressor.run(tmp_path / "missing.onnx", "quantize fp16", out=tmp_path / "out", **bad)
    assert not (tmp_path / "out").exists()


def test_compressor_min_seconds_sets_the_floor_that_an_option_overrides(
        toy_host: object, toy_model: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import compressor

    def floor(out: Path, *extra: str) -> float:
        result = CliRunner().invoke(cli, ["run", str(toy_model["model"]), "-q", "fp16", "--data",
                                          str(toy_model["eval"]), "--out", str(out), "--precision", "off", *extra])
        assert result.exit_code == 0, result.output
        return json.loads((out / "report.json").read_text())["settings"]["min_seconds"]

    monkeypatch.setenv("COMPRESSOR_MIN_SECONDS", "0.01")
    assert floor(tmp_path / "variable") == 0.01
    assert floor(tmp_path / "option", "--min-seconds", "0.02") == 0.02
    api = compressor.measure(toy_model["model"], data=toy_model["eval"], out=tmp_path / "api")
    assert api.settings["min_seconds"] == 0.01
    monkeypatch.delenv("COMPRESSOR_MIN_SECONDS")
    assert MeasureSettings().min_seconds == 0.5
    monkeypatch.setenv("COMPRESSOR_MIN_SECONDS", "soon")
    result = CliRunner().invoke(cli, ["run", str(toy_model["model"]), "-q", "fp16", "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "COMPRESSOR_MIN_SECONDS" in result.output, result.output
    assert not (tmp_path / "bad").exists()
    with pytest.raises(compressor.CompressorError, match="COMPRESSOR_MIN_SECONDS='soon' is not a number"):
        compressor.measure(toy_model["model"], data=toy_model["eval"], out=tmp_path / "api-bad")
