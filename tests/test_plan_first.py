"""Every refusal before any work: all backends of a multi-backend run, every step of every
variant, the data each step needs, and ``--set label_output=`` against the original's outputs."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import search_backend
from click.testing import CliRunner
from conftest import registered
from search_backend import write_dial

from compressor import hookimpl
from compressor.cli import cli


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The dial backend (every load, compress and save it does recorded) and the dialx
    backend, which refuses prune for the loaded model (and does its work through dial's hooks)."""
    calls: list[str] = []

    def recording(hook: str) -> Any:
        real = getattr(search_backend, hook)

        @functools.wraps(real)  # pluggy reads the hook's argument names from the signature
        def call(*args: Any, **kwargs: Any) -> Any:
            step = kwargs.get("step", args[1] if hook == "compressor_compress" and len(args) > 1 else None)
            calls.append(f"{hook} {step}" if step is not None else hook)
            return real(*args, **kwargs)

        return hookimpl(call)

    for hook in ("compressor_load", "compressor_compress", "compressor_save"):
        monkeypatch.setattr(search_backend, hook, recording(hook))
    with registered("search_backend", "dial"), registered("refusing_dial", "dialx"):
        yield calls


def run(*args: object) -> Any:
    return CliRunner().invoke(cli, ["run", *map(str, args), "--min-seconds", "0"])


def test_a_step_the_second_backend_refuses_stops_the_run_before_the_first_does_any_work(
        recorded: list[str], tmp_path: Path) -> None:
    """--backend onnx,tflite --prune 0.5 -q ... on a PyTorch model: tflite refuses prune. Before,
    the onnx variants were made and measured first, then the run refused and threw them away."""
    files = write_dial(tmp_path / "in")
    out = tmp_path / "out"
    result = run(files["model"], "--backend", "dial,dialx", "--prune", "0.5", "-q", "int8", "-q", "fp16",
                 "--data", files["data"], "--calibration-data", files["data"], "-o", out)
    assert result.exit_code == 2, result.output
    assert "'prune 0.5' is not available for this model on backend 'dialx'" in result.stderr
    assert [call for call in recorded if call != "compressor_load"] == []  # nothing made, nothing saved
    assert not out.exists()


def test_data_a_step_needs_is_asked_for_before_any_backend_loads_the_model(
        recorded: list[str], tmp_path: Path) -> None:
    files = write_dial(tmp_path / "in")
    result = run(files["model"], "--backend", "dial,dialx", "-q", "fp16", "-q", "int8", "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "variant 'int8': 'quantize int8' needs --calibration-data on backend 'dialx'" in result.stderr
    assert recorded == []  # not even loaded
    assert not (tmp_path / "out").exists()


def test_a_label_output_naming_no_output_is_refused_before_any_variant_is_made(
        recorded: list[str], tmp_path: Path) -> None:
    files = write_dial(tmp_path / "in")
    result = run(files["model"], "--backend", "dial", "-q", "int8", "--set", "label_output=scores",
                 "--data", files["data"], "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "label_output=scores names no compared output; the outputs are logits" in result.stderr
    assert not [call for call in recorded if call.startswith("compressor_compress")]
    assert not (tmp_path / "out").exists()


def test_every_original_is_measured_before_any_variant_is_made(recorded: list[str], tmp_path: Path) -> None:
    files = write_dial(tmp_path / "in")
    out = tmp_path / "out"
    result = run(files["model"], "--backend", "dial,dialx", "-q", "int8", "--data", files["data"],
                 "--calibration-data", files["data"], "-o", out)
    assert result.exit_code == 0, result.output
    # dialx does its work through dial's hooks: both are recorded. Both models loaded, both originals
    # made (and measured), then the variants (dialx loads the file again: it has no compressor_fork).
    assert recorded == ["compressor_load"] * 2 + ["compressor_save"] * 2 + [
        "compressor_compress quantize int8", "compressor_save",
        "compressor_load", "compressor_compress quantize int8", "compressor_save"]
    merged = json.loads((out / "report.json").read_text())
    assert [v["name"] for v in merged["variants"]] == ["dial:original", "dial:int8", "dialx:original",
                                                       "dialx:int8"]
    assert merged["variants"][3]["metrics"]["agreement"] > 0.9

