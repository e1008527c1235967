"""The cache across runs in ``compressor search``: a search run again makes and measures
nothing (the counting backend records every step) and finds the same trials, winner,
best file and recipe; --no-cache makes them again; a trial that ``run`` made is reused;
``compare`` reads the reports of a rerun."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import counting_backend
import pytest
from click.testing import CliRunner
from conftest import registered
from counting_backend import write_count

from compressor import cache
from compressor.cli import cli

SPACE = '[search.stages]\nprune = ["none", "prune 0.25", "prune 0.5"]\nquantize = ["none", "quantize fp16", "quantize int8"]\n'
#: What a measurement found: equal only when it is the same measurement, not a new one.
MEASURED = ("latency_ms", "load_ms", "measure_seconds", "size_bytes", "accuracy", "agreement")


@pytest.fixture
def counting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, ...]]]:
    monkeypatch.setenv(cache.CACHE_SWITCH_VARIABLE, "on")
    monkeypatch.setenv(cache.CACHE_DIR_VARIABLE, str(tmp_path / "cache"))
    with registered("counting_backend", "counting"):
        counting_backend.CALLS.clear()
        yield counting_backend.CALLS


def search(files: dict[str, Path], space: Path, out: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    result = CliRunner().invoke(cli, ["search", str(files["model"]), "--data", str(files["data"]), "--space",
                                      str(space), "--max-accuracy-drop", "1", "--max-trials", "8",
                                      "--min-seconds", "0", "-o", str(out), "--quiet", *args])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return result.exit_code, report, result.output


def figures(report: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Each trial's name, state, reason, whether it won, and what its measurement found."""
    return [(v["name"], v["metadata"]["search"]["state"], v["metadata"]["search"]["reason"],
             v["metadata"]["search"]["winner"], *(v["metrics"].get(key) for key in MEASURED))
            for v in report["variants"]]


def notes(report: dict[str, Any], name: str) -> list[str]:
    return next(v["notes"] for v in report["variants"] if v["name"] == name)


def test_a_search_run_again_makes_and_measures_nothing_and_finds_the_same(
        counting: list[tuple[str, ...]], tmp_path: Path) -> None:
    # 900 examples: every trial is first measured on the first 450 (the subset measurement is kept too).
    files = write_count(tmp_path / "in", rows=900)
    space = tmp_path / "space.toml"
    space.write_text(SPACE)
    code, first, _ = search(files, space, tmp_path / "first")
    assert code == 0, first
    made = [call[1] for call in counting if call[0] == "compress"]
    assert made and first["settings"]["search"]["reused"] == {"artifacts": 0, "measurements": 0}
    tried = first["settings"]["search"]["tried"]
    states = [v["metadata"]["search"]["state"] for v in first["variants"][1:]]
    assert "measured" in states and "stopped early" in states

    counting.clear()
    code, second, output = search(files, space, tmp_path / "second")
    assert code == 0, output
    assert counting == []  # nothing forked or compressed
    # Every trial made came from the cache, and every measurement: the original's (on the
    # whole data and on the subset), and each measured trial's (on the subset first, then on
    # the whole data where it was not stopped).
    reused = second["settings"]["search"]["reused"]
    assert reused == {"artifacts": tried, "measurements": 2 + 2 * states.count("measured")
                      + states.count("stopped early")}
    assert f"from the cache: {tried} artifacts, {reused['measurements']} measurements" in output
    assert figures(second) == figures(first)
    assert second["settings"]["search"]["winner"] == first["settings"]["search"]["winner"]
    for name in ("best.dial", "recipe.toml"):
        assert (tmp_path / "second" / name).read_bytes() == (tmp_path / "first" / name).read_bytes()
    assert any(note.startswith("cached: measured in an earlier run on this machine")
               for note in notes(second, "original"))
    winner = second["settings"]["search"]["winner"]
    assert any(note.startswith("cached: made in an earlier run") for note in notes(second, winner))
    assert any(note.startswith("cached: measured in an earlier run") for note in notes(second, winner))

    # compare after the rerun: the two searches side by side, with the same figures.
    compared = CliRunner().invoke(cli, ["compare", str(tmp_path / "first"), str(tmp_path / "second"),
                                        "-o", str(tmp_path / "both")])
    assert compared.exit_code == 0, compared.output
    both = json.loads((tmp_path / "both" / "report.json").read_text())["variants"]
    by_name = {v["name"]: v["metrics"].get("size_bytes") for v in both}
    assert by_name[f"first:{winner}"] == by_name[f"second:{winner}"] is not None

    # --no-cache: made and measured again, with nothing read.
    counting.clear()
    code, third, _ = search(files, space, tmp_path / "third", "--no-cache")
    assert code == 0
    assert sorted(call[1] for call in counting if call[0] == "compress") == sorted(made)
    assert third["settings"]["search"]["reused"] is None
    assert not any(note.startswith("cached") for v in third["variants"] for note in v["notes"])


def test_a_trial_that_run_made_is_reused_and_measured_as_search_measures(
        counting: list[tuple[str, ...]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_count(tmp_path / "in")
    space = tmp_path / "space.toml"
    space.write_text('[search.stages]\nquantize = ["none", "quantize fp16", "quantize int8"]\n')
    ran = CliRunner().invoke(cli, ["run", str(files["model"]), "--data", str(files["data"]), "-q", "int8",
                                   "--min-seconds", "0", "--quiet", "-o", str(tmp_path / "run")])
    assert ran.exit_code == 0, ran.output
    counting.clear()
    code, found, _ = search(files, space, tmp_path / "search", "--objective", "latency")
    assert code == 0
    assert [call[1] for call in counting if call[0] == "compress"] == ["quantize fp16"]  # int8: made by run
    int8 = notes(found, "int8")
    assert any(note.startswith("cached: made in an earlier run") for note in int8)
    # run timed int8 beside the original (--precision); search times it alone: measured again.
    assert not any(note.startswith("cached: measured") for note in int8)
    # The original is measured alike by both: reused.
    assert any(note.startswith("cached: measured") for note in notes(found, "original"))
    assert found["settings"]["search"]["reused"] == {"artifacts": 1, "measurements": 1}
    # A cache setting that cannot be read is refused before any work, as run refuses it.
    monkeypatch.setenv(cache.MAX_BYTES_VARIABLE, "lots")
    counting.clear()
    code, _, output = search(files, space, tmp_path / "refused")
    assert code == 2 and "COMPRESSOR_CACHE_MAX_BYTES='lots'" in output
    assert counting == [] and not (tmp_path / "refused").exists()
