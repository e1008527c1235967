"""Progress that tells time: the run's share done for callbacks, seconds per step, measuring's
repeat counter named, and a line every few seconds when stderr is not a terminal."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import compressor
from compressor import clibase
from compressor.cli import cli


def test_the_python_callback_gets_the_share_of_the_whole_run(toy_host, toy_model) -> None:
    heard: list[tuple[str, float | None]] = []
    compressor.run(toy_model["model"], [["prune 0.5", "quantize dynamic"]], data=toy_model["eval"],
                   min_seconds=0, repeats=2,
                   progress=lambda message, fraction: heard.append((message, fraction)))
    shares = [fraction for _, fraction in heard]
    assert None not in shares
    assert shares == sorted(shares) and shares[0] == 0.0 and shares[-1] == 1.0
    messages = [message for message, _ in heard]
    assert "[2/2] prune0.5-dynamic: quantize dynamic" in messages  # each step of a variant
    assert "measuring prune0.5-dynamic, repeat 2 of 2" in messages
    # the original is made and measured before any variant is made
    assert messages.index("measuring original, repeat 1 of 2") < messages.index("[2/2] prune0.5-dynamic: prune 0.5")


def test_a_step_longer_than_two_seconds_shows_its_seconds_and_the_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(clibase.PROGRESS, "message", "measuring dynamic, repeat 1 of 3")
    monkeypatch.setitem(clibase.PROGRESS, "fraction", 0.4)
    now = time.monotonic()
    monkeypatch.setitem(clibase.PROGRESS, "since", now - 42.2)
    assert clibase.progress_line(now) == " 40% measuring dynamic, repeat 1 of 3, 42 s"
    monkeypatch.setitem(clibase.PROGRESS, "since", now - 1)
    monkeypatch.setitem(clibase.PROGRESS, "fraction", None)
    assert clibase.progress_line(now) == "measuring dynamic, repeat 1 of 3"


def _slow_run(toy_model: dict[str, Path], out: Path, *flags: str) -> object:
    return CliRunner().invoke(cli, ["run", str(toy_model["model"]), "-q", "fp16", "--data", str(toy_model["eval"]),
                                    "--min-seconds", "0.3", "-o", str(out), *flags])


def test_without_a_terminal_a_line_comes_every_few_seconds(toy_host, toy_model, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(clibase.PROGRESS_EVERY, "seconds", 0.2)
    result = _slow_run(toy_model, tmp_path / "out")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("progress: ")]
    assert len(lines) >= 2, result.stderr
    assert any("% measuring " in line for line in lines), lines
    assert all(line.endswith(" s in all)") for line in lines)


def test_quiet_prints_no_progress(toy_host, toy_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(clibase.PROGRESS_EVERY, "seconds", 0.2)
    monkeypatch.setitem(clibase.PROGRESS, "quiet", False)
    result = _slow_run(toy_model, tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    assert "progress:" not in result.stderr
