"""The run pipeline's contract with plugins: a plugin's exception fails its variant only,
named, with its traceback for --debug; facts reach the report through the Artifact save
returns (or, as before, through the Model); the closing line says what was written."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from test_core_run import invoke

from compressor import Artifact, hookimpl


@contextmanager
def plugged(host: Any, plugin: object, name: str) -> Iterator[None]:
    """``plugin`` (an object declaring no backend: it takes part for every backend) on ``host``."""
    host.register(plugin, name=name)
    try:
        yield
    finally:
        host.unregister(name)


class BuggyQuantizer:
    """Raises a plain Python error (a bug, not a CompressionError) for ``quantize fp16``."""

    @hookimpl(tryfirst=True)
    def compressor_compress(self, model, step, context):
        if step.technique == "quantize" and step.mode == "fp16":
            raise ZeroDivisionError("fp16 scale is zero in the buggy plugin")
        return None


def test_a_plugins_exception_in_compress_fails_that_variant_and_the_run_goes_on(
        toy_host, toy_model, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with plugged(toy_host, BuggyQuantizer(), "buggy"):
        result = invoke("run", toy_model["model"], "-q", "fp16", "-q", "dynamic", "--data", toy_model["eval"],
                        "--min-seconds", "0", "-o", out)
    assert result.exit_code == 7, result.output
    assert result.stderr.strip().splitlines()[-1] == "error: variant(s) failed: fp16"
    assert "Traceback" not in result.stderr
    report = json.loads((out / "report.json").read_text())
    fp16, dynamic = report["variants"][1], report["variants"][2]
    assert fp16["error"] == ("plugin 'toy' (backend 'toy') raised ZeroDivisionError at step 'quantize fp16': "
                             "fp16 scale is zero in the buggy plugin")
    assert fp16["artifact"] is None and not (out / "fp16.toy").exists()
    assert dynamic["error"] is None and dynamic["metrics"]["agreement"] > 0.5 and (out / "dynamic.toy").is_file()


def test_debug_shows_the_frame_of_the_plugin_that_failed_a_variant(toy_host, toy_model, tmp_path: Path) -> None:
    with plugged(toy_host, BuggyQuantizer(), "buggy"):
        result = invoke("run", toy_model["model"], "-q", "fp16", "-o", tmp_path / "out", "--min-seconds", "0",
                        "--debug")
    assert result.exit_code != 0
    assert "variant 'fp16': plugin 'toy' at step 'quantize fp16'" in result.stderr
    assert "test_core_pipeline.py" in result.stderr and "in compressor_compress" in result.stderr
    assert "ZeroDivisionError: fp16 scale is zero in the buggy plugin" in result.stderr


def test_a_plugins_exception_while_saving_the_original_stops_the_run_naming_it(
        toy_host, toy_model, tmp_path: Path) -> None:
    class BrokenSave:
        @hookimpl(tryfirst=True)
        def compressor_save(self, model, destination, context):
            raise KeyError("no writer")

    with plugged(toy_host, BrokenSave(), "broken-save"):
        result = invoke("run", toy_model["model"], "-q", "fp16", "-o", tmp_path / "out")
    assert result.exit_code == 7 and result.stderr.count("\n") == 1, result.output
    assert "could not convert the original model: plugin 'toy' (backend 'toy') raised KeyError while " \
           "saving 'original'" in result.stderr
    assert not (tmp_path / "out").exists()


class FactsInTheArtifact:
    """Saves as the toy does, then reports facts the new way: in the Artifact it returns."""

    @hookimpl(wrapper=True, tryfirst=True)
    def compressor_save(self, model, destination, context):
        saved = yield
        return Artifact(saved.backend, saved.path, saved.format, saved.side_files,
                        metadata={"written_by": "artifact", "bytes": saved.path.stat().st_size},
                        notes=("saved with the new facts",))


class FactsOnTheModel:
    """The older way a save reported facts, still honoured: mutating the Model it was given."""

    @hookimpl(wrapper=True, tryfirst=True)
    def compressor_save(self, model, destination, context):
        model.metadata["written_by"] = "model"
        model.notes.append("saved the old way")
        return (yield)


def test_facts_from_save_reach_the_report_through_the_artifact_or_the_model(
        toy_host, toy_model, tmp_path: Path) -> None:
    with plugged(toy_host, FactsInTheArtifact(), "artifact-facts"):
        result = invoke("run", toy_model["model"], "-q", "fp16", "--min-seconds", "0", "-o", tmp_path / "new")
    assert result.exit_code == 0, result.output
    for variant in json.loads((tmp_path / "new" / "report.json").read_text())["variants"]:
        assert variant["metadata"]["written_by"] == "artifact"
        assert variant["metadata"]["bytes"] == (tmp_path / "new" / variant["artifact"]).stat().st_size
        assert variant["notes"].count("saved with the new facts") == 1
    with plugged(toy_host, FactsOnTheModel(), "model-facts"):
        result = invoke("run", toy_model["model"], "-q", "fp16", "--min-seconds", "0", "-o", tmp_path / "old")
    assert result.exit_code == 0, result.output
    fp16 = json.loads((tmp_path / "old" / "report.json").read_text())["variants"][1]
    assert fp16["metadata"]["written_by"] == "model" and "saved the old way" in fp16["notes"]


def test_the_closing_line_names_only_what_was_written(toy_host, toy_model, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    out = tmp_path / "out"
    result = invoke("run", toy_model["model"], "-q", "fp16", "--data", toy_model["eval"], "--min-seconds", "0",
                    "-o", out)
    assert result.exit_code == 0, result.output
    assert not (out / "report.png").exists()
    line = next(line for line in result.stdout.splitlines() if line.startswith("wrote "))
    assert line == f"wrote {out}/: artifacts, report.json, report.md, report.html; no report.png " \
                   "(matplotlib is not installed: pip install matplotlib)"


def test_the_backend_is_identified_once_per_run(toy_host, toy_model, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[Path] = []
    identify = toy_host.identify

    def counting(path: Path) -> str | None:
        asked.append(path)
        return identify(path)

    monkeypatch.setattr(toy_host, "identify", counting)
    result = invoke("run", toy_model["model"], "--data", toy_model["eval"], "--min-seconds", "0",
                    "-o", tmp_path / "out")  # no variants: the backend's defaults, read from it once
    assert result.exit_code == 0, result.output
    assert asked == [toy_model["model"]]
    names = [variant["name"] for variant in json.loads((tmp_path / "out" / "report.json").read_text())["variants"]]
    assert names == ["original", "fp16", "dynamic"]
