"""The fault suite: bad and hostile inputs through the real CLI, for every format.

Each case checks the four promises: a one-line error naming the file, the
documented exit code, nothing at the output path or beside the input, and the
input's bytes unchanged.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import snapshot
from fasttext_fixtures import FastTextFiles, ft, patched  # noqa: F401 - ft is a fixture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx_fixtures import (
    FACTORY,
    make_digits_files,
    set_external_location,
    tiny_onnx_with_external_data,
)
from tflite_fixtures import lambda_model_files, shared_digits_files

from compressor import Context
from compressor.cli import cli

USAGE, UNSAFE, INVALID, UNSUPPORTED, FAILED = 2, 3, 4, 5, 7


@dataclass(frozen=True)
class Valid:
    """One valid file per supported format, to corrupt."""

    files: dict[str, Path]
    digits_eval: Path


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory, ft: FastTextFiles) -> Valid:  # noqa: F811
    import torch

    from compressor_tflite import plugin as tflite_plugin

    folder = tmp_path_factory.mktemp("valid")
    digits = make_digits_files(folder / "onnx")
    program = torch.export.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),))
    torch.export.save(program, folder / "linear.pt2")
    keras = shared_digits_files()
    model = tflite_plugin.compressor_load(keras.keras, "tflite", Context())
    tflite = tflite_plugin.compressor_save(model, folder / "cnn", Context()).path
    return Valid(
        {".onnx": digits.onnx, ".pt": digits.state_dict, ".pt2": folder / "linear.pt2",
         ".keras": keras.keras, ".h5": keras.h5, ".tflite": tflite, ".bin": ft.model,
         ".ftz": ft.quantized},
        digits.eval,
    )


def check_refused(
    model: Path, code: int, message: str, tmp_path: Path, *args: str, inputs: Path | None = None
) -> None:
    """Run ``compressor run`` and check the four promises."""
    folder = inputs or model.parent
    before = snapshot(folder)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(model), "-o", str(out), *args])
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()
    assert snapshot(folder) == before


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda data: b"",
    "half": lambda data: data[: len(data) // 2],
    "random": lambda data: np.random.default_rng(len(data)).bytes(max(len(data), 256)),
}
FORMATS = (".onnx", ".pt", ".pt2", ".keras", ".h5", ".tflite", ".bin", ".ftz")


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("suffix", FORMATS)
def test_every_format_empty_truncated_or_random_is_invalid(
    valid: Valid, tmp_path: Path, suffix: str, corruption: str
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    broken = inputs / f"model{suffix}"
    broken.write_bytes(CORRUPTIONS[corruption](valid.files[suffix].read_bytes()))
    extra = ["--set", f"model_factory={FACTORY}"] if suffix == ".pt" else []
    check_refused(broken, INVALID, str(broken), tmp_path, *extra)


@pytest.mark.parametrize(
    ("real", "claimed"),
    [(".keras", ".onnx"), (".onnx", ".keras"), (".bin", ".tflite"), (".tflite", ".h5"), (".h5", ".bin")],
)
def test_an_extension_that_lies_is_named(valid: Valid, tmp_path: Path, real: str, claimed: str) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    liar = inputs / f"model{claimed}"
    shutil.copyfile(valid.files[real], liar)
    check_refused(liar, INVALID, str(liar), tmp_path)


class CreatesMarker:
    """Unpickling this creates a file: code execution a loader must not allow."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_a_pickle_that_would_run_code_does_not(tmp_path: Path) -> None:
    import torch

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    marker = tmp_path / "marker"
    evil = inputs / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": CreatesMarker(marker)}, evil)
    check_refused(evil, UNSAFE, "--trust", tmp_path, "--set", f"model_factory={FACTORY}")
    assert not marker.exists()


def test_torchscript_needs_the_trust_flag(tmp_path: Path) -> None:
    import torch

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    scripted = inputs / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), scripted)
    check_refused(scripted, UNSAFE, "--trust", tmp_path, "--set", "input_shape=1,4")


@pytest.mark.parametrize("which", [0, 1], ids=[".keras", ".h5"])
def test_keras_lambda_layers_need_the_trust_flag(tmp_path: Path, which: int) -> None:
    model = lambda_model_files(tmp_path / "inputs")[which]
    check_refused(model, UNSAFE, "Lambda", tmp_path)


@pytest.mark.parametrize("location", ["../x.bin", "/etc/passwd", "link.bin"])
def test_onnx_external_data_must_stay_in_the_model_folder(tmp_path: Path, location: str) -> None:
    model = tiny_onnx_with_external_data(tmp_path / "inputs")
    (tmp_path / "x.bin").write_bytes(bytes(128))
    if location == "link.bin":
        os.symlink(tmp_path / "x.bin", tmp_path / "inputs" / "link.bin")
    set_external_location(model, location)
    check_refused(model, UNSAFE, "outside" if location != "/etc/passwd" else "absolute", tmp_path)


@pytest.mark.parametrize(("damage", "message"), [("missing", "missing"), ("short", "shorter")])
def test_onnx_external_data_missing_or_short(tmp_path: Path, damage: str, message: str) -> None:
    model = tiny_onnx_with_external_data(tmp_path / "inputs")
    weights = tmp_path / "inputs" / "weights.bin"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:40])
    check_refused(model, INVALID, message, tmp_path)


def test_fasttext_header_declaring_enormous_dimensions(ft: FastTextFiles, tmp_path: Path) -> None:  # noqa: F811
    from fasttext_fixtures import ARGS_OFFSET

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    huge = patched(ft.model, inputs / "huge.bin", ARGS_OFFSET, "<i", 2_000_000_000)
    check_refused(huge, INVALID, str(huge), tmp_path)


def test_fasttext_requests_it_cannot_serve(ft: FastTextFiles, tmp_path: Path) -> None:  # noqa: F811
    check_refused(ft.vectors, UNSUPPORTED, "supervised", tmp_path, "--pq", inputs=ft.folder)
    check_refused(ft.model, USAGE, "--train-data", tmp_path, "--pq", "--set", "retrain=true",
                  inputs=ft.folder)


def test_fasttext_too_few_rows_fails_its_variant(ft: FastTextFiles, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(ft.tiny), "--pq", "-o", str(out)])
    assert result.exit_code == FAILED and "256" in result.output


@pytest.mark.parametrize("where", ["input", "input folder"])
def test_output_over_the_input_is_refused(valid: Valid, tmp_path: Path, where: str) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    model = inputs / "digits.onnx"
    shutil.copyfile(valid.files[".onnx"], model)
    before = snapshot(inputs)
    target = model if where == "input" else inputs
    result = CliRunner().invoke(cli, ["run", str(model), "-q", "dynamic", "-o", str(target)])
    assert result.exit_code == USAGE and "choose another --out" in result.stderr
    assert snapshot(inputs) == before


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((5, 63), np.float32)}, "shape (5, 63)"),
        ({"x": np.array([["a"] * 64] * 5)}, "dtype"),
        ({"pixels": np.zeros((5, 64), np.float32)}, "model's inputs are: x"),
        ({"x": np.zeros((5, 64), np.float32), "y": np.zeros(4, np.int64)}, "one label per example"),
        ({"x": np.zeros((0, 64), np.float32)}, "no examples"),
    ],
)
def test_data_files_that_do_not_fit_the_model(valid: Valid, tmp_path: Path, arrays: dict, message: str) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    data = inputs / "data.npz"
    np.savez(data, **arrays)
    check_refused(valid.files[".onnx"], INVALID, message, tmp_path, "--data", str(data), inputs=inputs)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fasttext_header_checks_never_crash_on_damaged_files(
    ft: FastTextFiles, tmp_path: Path, data: st.DataObject  # noqa: F811
) -> None:
    """Any truncation or overwrite of the header region is refused cleanly or read as valid."""
    from compressor import InvalidInputError
    from compressor_fasttext.header import read_layout

    original = ft.model.read_bytes()
    damaged = bytearray(original)
    if data.draw(st.booleans(), label="truncate"):
        damaged = damaged[: data.draw(st.integers(0, len(original) - 1), label="length")]
    else:
        offset = data.draw(st.integers(0, 4095), label="offset")
        patch = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
        damaged[offset : offset + len(patch)] = patch
    path = tmp_path / "damaged.bin"
    path.write_bytes(bytes(damaged))
    try:
        layout = read_layout(path)
    except InvalidInputError as error:
        assert str(path) in str(error)
    else:
        assert layout.dim > 0 and path.stat().st_size == len(damaged)
