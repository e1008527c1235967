"""The cache across runs in Ray runs: the driver looks variants up before sending them to
the cluster, keeps what the cluster made, and keeps what it measured only when the worker's
machine is the one the key names; a run with everything cached does not start Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from search_backend import write_dial

from compressor import cache, run_cache
from compressor.cli import cli

ray = pytest.importorskip("ray", reason="the ray extra is not installed (CI installs it)")

#: What a measurement found: equal only when it is the same measurement, not a new one.
MEASURED = ("latency_ms", "load_ms", "measure_seconds", "size_bytes", "agreement")


def run_on_ray(files: dict[str, Path], out: Path, *variants: str) -> dict[str, dict[str, Any]]:
    arguments = ["run", str(files["model"]), "--data", str(files["data"]), "--min-seconds", "0", "--quiet",
                 "--executor", "ray", "-o", str(out)]
    for mode in variants:
        arguments += ["-q", mode]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    return {v["name"]: v for v in json.loads((out / "report.json").read_text())["variants"]}


def cached(variant: dict[str, Any], what: str) -> bool:
    return any(note.startswith(f"cached: {what} in an earlier run") for note in variant["notes"])


@pytest.mark.slow
def test_a_ray_run_sends_only_what_the_cache_lacks(dial_host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.CACHE_SWITCH_VARIABLE, "on")
    monkeypatch.setenv(cache.CACHE_DIR_VARIABLE, str(tmp_path / "cache"))
    files = write_dial(tmp_path / "in")
    # The driver's key names another machine than the workers': their measurements are not
    # kept, what they made is.
    real_machine = run_cache.machine
    with monkeypatch.context() as patch:
        patch.setattr(run_cache, "machine", lambda: {**real_machine(), "cpu": "another CPU"})
        first = run_on_ray(files, tmp_path / "first", "int8")
    assert first["int8"]["metadata"]["made_on_node"] and first["int8"]["metrics"]["node"]

    second = run_on_ray(files, tmp_path / "second", "int8", "fp16")
    # int8 not made on the cluster again, but measured there: its measurement was not kept.
    assert cached(second["int8"], "made") and "made_on_node" not in second["int8"]["metadata"]
    assert not cached(second["int8"], "measured") and second["int8"]["metrics"]["node"]
    assert not cached(second["original"], "measured") and second["original"]["metrics"]["node"]
    assert second["fp16"]["metadata"]["made_on_node"] and not cached(second["fp16"], "made")
    assert (tmp_path / "second" / "int8.dial").read_bytes() == (tmp_path / "first" / "int8.dial").read_bytes()

    third = run_on_ray(files, tmp_path / "third", "int8", "fp16")
    assert any("Ray was not started" in note for note in third["original"]["notes"])
    for name, variant in third.items():
        assert cached(variant, "measured") and "node" not in variant["metrics"]
        assert {key: variant["metrics"].get(key) for key in MEASURED} == \
            {key: second[name]["metrics"].get(key) for key in MEASURED}
        assert variant["steps"] == second[name]["steps"]
    assert all(cached(third[name], "made") for name in ("int8", "fp16"))
    assert not ray.is_initialized()
    compared = CliRunner().invoke(cli, ["compare", str(tmp_path / "second"), str(tmp_path / "third"),
                                        "-o", str(tmp_path / "both")])
    assert compared.exit_code == 0, compared.output
