"""A run loads its model once, states its memory, checks disk space first, and
shows a child's traceback with --debug wherever --debug is written."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from collections import namedtuple
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import snapshot
from test_core_run import invoke

from compressor import diskspace, hookimpl


class CountingFork:
    """Counts loads and forks; forks share the loaded handle (the toy's steps copy)."""

    def __init__(self) -> None:
        self.loads = 0
        self.forks = 0

    @hookimpl(wrapper=True)
    def compressor_load(self, path, backend, context):
        self.loads += 1
        return (yield)

    @hookimpl
    def compressor_fork(self, model, context):
        self.forks += 1
        return dataclasses.replace(model, notes=list(model.notes), metadata=dict(model.metadata))


def test_a_backend_that_forks_is_loaded_once_per_run(toy_host, toy_model, tmp_path: Path) -> None:
    counter = CountingFork()
    toy_host.register(counter, name="counter")
    try:
        result = invoke("run", toy_model["model"], "-q", "fp16", "-q", "dynamic", "--prune", "0.5",
                        "--data", toy_model["eval"], "--min-seconds", "0", "-o", tmp_path / "out")
    finally:
        toy_host.unregister("counter")
    assert result.exit_code == 0, result.output
    assert (counter.loads, counter.forks) == (1, 2)
    variants = json.loads((tmp_path / "out" / "report.json").read_text())["variants"]
    # Each variant started from the untouched original: pruning one did not prune the next.
    assert variants[1]["metrics"]["agreement"] == variants[2]["metrics"]["agreement"] < 1.0


def test_without_a_fork_the_model_is_reloaded_per_variant(toy_host, toy_model, tmp_path: Path) -> None:
    class CountingLoads:
        loads = 0

        @hookimpl(wrapper=True)
        def compressor_load(self, path, backend, context):
            CountingLoads.loads += 1
            return (yield)

    toy_host.register(CountingLoads(), name="loads")
    try:
        result = invoke("run", toy_model["model"], "-q", "fp16", "-q", "dynamic", "--min-seconds", "0",
                        "-o", tmp_path / "out")
    finally:
        toy_host.unregister("loads")
    assert result.exit_code == 0, result.output
    assert CountingLoads.loads == 3


def test_the_report_states_the_memory_of_loading_and_of_each_compress(toy_host, toy_model, tmp_path) -> None:
    result = invoke("run", toy_model["model"], "-q", "fp16", "--min-seconds", "0", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    variants = json.loads((tmp_path / "out" / "report.json").read_text())["variants"]
    original = variants[0]["metrics"]
    assert original["load_seconds"] >= 0
    # The parent is a Python process with numpy and click loaded: tens of MB at least.
    for variant in variants:
        assert variant["metrics"]["compress_peak_rss_bytes"] > 10_000_000
    assert original["load_peak_rss_bytes"] > 10_000_000


def test_a_run_that_would_not_fit_on_disk_is_refused_before_any_work(
    toy_host, toy_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    before = snapshot(toy_model["folder"])
    out = tmp_path / "deep" / "out"
    result = invoke("run", toy_model["model"], "-q", "fp16", "-o", out)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "not enough free disk space" in result.stderr
    assert not (tmp_path / "deep").exists()
    assert snapshot(toy_model["folder"]) == before
    forced = invoke("run", toy_model["model"], "-q", "fp16", "--min-seconds", "0", "-o", out,
                    "--no-space-check")
    assert forced.exit_code == 0, forced.output


def test_the_estimate_follows_the_steps(tmp_path: Path) -> None:
    from compressor.recipes import variants_from_strings

    fp16, dynamic, pruned = variants_from_strings([("quantize fp16",), ("quantize dynamic",), ("prune 0.5",)])
    assert diskspace.estimated_artifact_bytes(1000, fp16) == 500
    assert diskspace.estimated_artifact_bytes(1000, dynamic) == 300
    assert diskspace.estimated_artifact_bytes(1000, pruned) == 1000
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"x" * 300)
    (folder / "b.bin").write_bytes(b"x" * 200)
    assert diskspace.input_bytes(folder) == 500


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_is_accepted_before_and_after_the_subcommand(toy_host, tmp_path: Path, where: str) -> None:
    missing = tmp_path / "missing.toy"
    args = ["run", missing, "-q", "fp16", "-o", tmp_path / "out"]
    result = invoke(*(["--debug", *args] if where == "before" else [*args, "--debug"]))
    assert result.exit_code != 0
    assert isinstance(result.exception, Exception) and "no such file" in str(result.exception)


@contextmanager
def measurer_plugin(host: Any, folder: Path, name: str, body: str,
                    monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A module plugin (so it reaches the measuring process) made of ``body``."""
    folder.mkdir()
    (folder / f"{name}.py").write_text("from compressor import Measurement, Runtime, TensorSpec, hookimpl\n\n"
                                       + body)
    monkeypatch.syspath_prepend(str(folder))
    host.register(importlib.import_module(name), name=name)
    try:
        yield
    finally:
        host.unregister(name)
        sys.modules.pop(name, None)


#: A generic plugin (no backend) opening every artifact as a runtime whose run has a bug.
EXPLODING_RUNTIME = (
    "class Exploding(Runtime):\n"
    "    inputs = (TensorSpec('x', (None, 16), 'float32'),)\n"
    "    outputs = (TensorSpec('label', (None,), 'int64'),)\n\n"
    "    def run(self, feeds):\n"
    "        raise AssertionError('boom from the child')\n\n\n"
    "@hookimpl(tryfirst=True)\n"
    "def compressor_open_runtime(artifact, settings):\n"
    "    return Exploding()\n"
)


def test_debug_shows_the_measuring_child_traceback(toy_host, toy_model, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in a plugin's runtime is one line, exit 1 (not a data error), and --debug shows
    the plugin's own frame from the measuring process."""
    with measurer_plugin(toy_host, tmp_path / "plugin", "exploding_measurer", EXPLODING_RUNTIME, monkeypatch):
        plain = invoke("run", toy_model["model"], "-q", "fp16", "-o", tmp_path / "a")
        debug = invoke("run", toy_model["model"], "-q", "fp16", "-o", tmp_path / "b", "--debug")
    assert plain.exit_code == 1 and plain.stderr.count("\n") == 1
    assert "boom from the child" in plain.stderr and "Traceback" not in plain.stderr
    assert "Traceback" in debug.stderr and "exploding_measurer.py" in debug.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_fewer_predictions_than_examples_is_an_error_not_a_blank(toy_host, toy_model, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The deprecated ``compressor_measure`` hook, which let a plugin return fewer predictions
    than examples, is no longer called: the plugin is warned about, and core measures every
    example through the backend's runtime."""
    body = ("@hookimpl(trylast=True)\ndef compressor_measure(artifact, data, settings):\n"
            "    return Measurement(predictions=[0, 1, 2])\n")
    with pytest.warns(DeprecationWarning, match="compressor_measure is deprecated"), \
            measurer_plugin(toy_host, tmp_path / "plugin", "short_measurer", body, monkeypatch):
        result = invoke("run", toy_model["model"], "-q", "fp16", "--data", toy_model["eval"],
                        "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "plugin 'short_measurer' implements compressor_measure, which is deprecated" in result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for variant in report["variants"]:
        assert variant["metrics"]["outputs"]["label"]["task"] == "classifier"
        assert variant["metrics"]["changed_count"] <= 200 and "accuracy" in variant["metrics"]
    assert report["variants"][0]["metrics"]["confusion"]["matrix"] and \
        sum(map(sum, report["variants"][0]["metrics"]["confusion"]["matrix"])) == 200
