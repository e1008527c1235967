"""Bad input and interrupted runs on the toy backend: clean errors, nothing half-written."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import snapshot

from compressor import InvalidInputError, TensorSpec, hookimpl
from compressor.builtin import read_npz
from compressor.cli import cli

SPEC = (TensorSpec("x", (None, 16), "float32"),)


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 15), np.float32)}, "shape (4, 15), the model expects ('N', 16)"),
        ({"x": np.zeros((4, 16, 1), np.float32)}, "shape (4, 16, 1)"),
        ({"x": np.array([["a"] * 16] * 4)}, "dtype <U1, the model expects float32"),
        ({"features": np.zeros((4, 16), np.float32)}, "model's inputs are: x"),
        ({"x": np.zeros((4, 16), np.float32), "y": np.zeros(3, np.int64)}, "one label per example"),
        ({"x": np.zeros((4, 16), np.float32), "y": np.zeros(4, np.float32)}, "must be integers"),
        ({"x": np.zeros((0, 16), np.float32)}, "holds no examples"),
    ],
)
def test_data_that_does_not_fit_the_model_is_named(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    with pytest.raises(InvalidInputError) as caught:
        read_npz(path, SPEC)
    assert message in str(caught.value) and str(path) in str(caught.value)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", os.urandom(300)])
def test_unreadable_data_files_are_invalid_input(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "data.npz"
    path.write_bytes(content)
    with pytest.raises(InvalidInputError, match="not a readable .npz"):
        read_npz(path, SPEC)


def test_pickled_arrays_in_data_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, x=np.array([{"a": 1}] * 4, dtype=object))
    with pytest.raises(InvalidInputError):
        read_npz(path, SPEC)


class InterruptedSave:
    """Lets the toy backend write ``fp16.toy``, then cuts it in half and 'presses Ctrl-C'."""

    @hookimpl(wrapper=True)
    def compressor_save(self, model, destination, context):
        artifact = yield
        if artifact is not None and artifact.path.name == "fp16.toy":
            data = artifact.path.read_bytes()
            artifact.path.write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt
        return artifact


def test_an_interrupted_save_keeps_the_previous_output(toy_host, toy_model, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert invoke("run", toy_model["model"], "-q", "fp16", "-o", out).exit_code == 0
    previous = snapshot(out)
    toy_host.register(InterruptedSave(), name="interrupt")
    try:
        result = invoke("run", toy_model["model"], "-q", "fp16", "-q", "dynamic", "-o", out, "--force")
    finally:
        toy_host.unregister("interrupt")
    assert result.exit_code == 130 and "interrupted" in result.output
    assert snapshot(out) == previous
    assert sorted(p.name for p in out.iterdir()) == sorted(previous)


def test_an_interrupted_first_run_leaves_no_output_folder(toy_host, toy_model, tmp_path: Path) -> None:
    toy_host.register(InterruptedSave(), name="interrupt")
    try:
        result = invoke("run", toy_model["model"], "-q", "fp16", "-o", tmp_path / "out")
    finally:
        toy_host.unregister("interrupt")
    assert result.exit_code == 130
    assert not (tmp_path / "out").exists()


def test_a_read_only_input_folder_works(toy_host, toy_model, tmp_path: Path) -> None:
    folder = toy_model["folder"]
    before = snapshot(folder)
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        result = invoke("run", toy_model["model"], "-q", "fp16", "--data", toy_model["eval"],
                        "-o", tmp_path / "out")
    finally:
        folder.chmod(stat.S_IRWXU)
    assert result.exit_code == 0, result.output
    assert snapshot(folder) == before


def test_user_mistakes_are_one_line_without_traceback(tmp_path: Path) -> None:
    """As a real subprocess: stderr is exactly one line; --debug shows the traceback."""
    recipe = tmp_path / "r.toml"
    recipe.write_text("[variants.a]\nsteps = [\n")
    model = tmp_path / "m.toy"
    model.write_text("{}")
    command = [sys.executable, "-m", "compressor", "run", str(model), "--recipe", str(recipe),
               "-o", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {recipe}: invalid TOML")
    debug = subprocess.run([command[0], "-m", "compressor", "--debug", *command[3:]],
                           capture_output=True, text=True, timeout=120)
    assert "Traceback" in debug.stderr
    assert not (tmp_path / "out").exists()


def test_a_variant_that_fails_is_reported_and_the_others_kept(toy_host, toy_model, tmp_path) -> None:
    from compressor import CompressionError

    class FailingDynamic:
        @hookimpl(tryfirst=True)
        def compressor_compress(self, model, step, context):
            if step.mode == "dynamic":
                raise CompressionError("op Foo cannot be quantized")

    toy_host.register(FailingDynamic(), name="failing")
    try:
        result = invoke("run", toy_model["model"], "-q", "fp16", "-q", "dynamic", "-o", tmp_path / "out")
    finally:
        toy_host.unregister("failing")
    assert result.exit_code == 7 and "variant(s) failed: dynamic" in result.output
    variants = json.loads((tmp_path / "out" / "report.json").read_text())["variants"]
    assert variants[2]["error"] == "op Foo cannot be quantized"
    assert (tmp_path / "out" / "fp16.toy").exists() and not (tmp_path / "out" / "dynamic.toy").exists()


@pytest.mark.parametrize("number", [errno.EFBIG, errno.ENAMETOOLONG])
def test_file_size_limits_and_overlong_names_are_one_line_exit_2(toy_host, toy_model, tmp_path: Path,
                                                                 number: int) -> None:
    """What the OS says when a save hits ``ulimit -f`` or a name the filesystem refuses."""

    class FailingSave:
        @hookimpl(tryfirst=True)
        def compressor_save(self, model, destination, context):
            raise OSError(number, os.strerror(number), str(destination))

    toy_host.register(FailingSave(), name="failing-save")
    try:
        result = invoke("run", toy_model["model"], "-q", "fp16", "-o", tmp_path / "out")
    finally:
        toy_host.unregister("failing-save")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and os.strerror(number) in lines[0] and "unexpected" not in lines[0]
    assert not (tmp_path / "out").exists()
