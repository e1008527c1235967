"""Keras HDF5 weights that reach into other files are refused before Keras reads them.

Each disguise points the model's 4x2 kernel at a secret file outside the model's
folder: HDF5 external storage (absolute, or relative with ``..``), an external
link, a virtual dataset. Every one is refused with exit 3 in an ``.h5`` and in
the weights inside a ``.keras``, ``--trust`` or not, and the secret's bytes reach
no output and no scratch file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import snapshot
from tflite_fixtures import dense_model_files, edit_keras_weights, kernel_path

from compressor import Context, InvalidInputError, UnsafeInputError
from compressor.cli import cli
from compressor_frontends.keras import hdf5
from compressor_tflite import plugin

#: 32 bytes: as float32, the 4x2 kernel a disguise would load; eight equal values,
#: so the bytes survive TFLite's transposed weight layout unchanged.
SECRET = b"SCRT" * 8
SECRET_VALUES = np.frombuffer(SECRET, "<f4").reshape(4, 2)


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    keras, h5 = dense_model_files(tmp_path_factory.mktemp("dense"))
    return {".keras": keras, ".h5": h5}


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    """``tmp/inputs`` for the model, the secret beside it (outside the model's folder),
    and a private ``$TMPDIR``. The working directory is ``tmp/inputs``, so the relative
    ``../secret.bin`` would resolve (HDF5 resolves against the working directory)."""
    import h5py

    inputs, scratch = tmp_path / "inputs", tmp_path / "tmp"
    inputs.mkdir()
    scratch.mkdir()
    (tmp_path / "secret.bin").write_bytes(SECRET)
    with h5py.File(tmp_path / "secret.h5", "w") as file:
        file["data"] = SECRET_VALUES
    monkeypatch.chdir(inputs)
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    yield {"root": tmp_path, "inputs": inputs, "tmp": scratch}


def external_absolute(file: Any, root: Path) -> None:
    _replace(file, lambda name: file.create_dataset(
        name, shape=(4, 2), dtype="<f4", external=[(str(root / "secret.bin"), 0, len(SECRET))]))


def external_relative(file: Any, root: Path) -> None:
    _replace(file, lambda name: file.create_dataset(
        name, shape=(4, 2), dtype="<f4", external=[("../secret.bin", 0, len(SECRET))]))


def external_link(file: Any, root: Path) -> None:
    import h5py

    _replace(file, lambda name: file.__setitem__(name, h5py.ExternalLink(str(root / "secret.h5"), "/data")))


def virtual_dataset(file: Any, root: Path) -> None:
    import h5py

    layout = h5py.VirtualLayout(shape=(4, 2), dtype="<f4")
    layout[:] = h5py.VirtualSource(str(root / "secret.h5"), "data", shape=(4, 2))
    _replace(file, lambda name: file.create_virtual_dataset(name, layout))


def _replace(file: Any, create: Callable[[str], object]) -> None:
    name = kernel_path(file)
    del file[name]
    create(name)


DISGUISES: dict[str, tuple[Callable[[Any, Path], None], str]] = {
    "absolute external storage": (external_absolute, "HDF5 external storage"),
    "relative external storage": (external_relative, "'../secret.bin', HDF5 external storage"),
    "external link": (external_link, "an HDF5 external link"),
    "virtual dataset": (virtual_dataset, "HDF5 virtual dataset"),
}


def disguised(originals: dict[str, Path], layout: dict[str, Path], suffix: str, disguise: str) -> Path:
    edit, _ = DISGUISES[disguise]
    return edit_keras_weights(
        originals[suffix], layout["inputs"] / f"model{suffix}", lambda file: edit(file, layout["root"])
    )


@pytest.mark.parametrize("disguise", DISGUISES)
@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_weights_in_another_file_are_refused(
    originals: dict[str, Path], layout: dict[str, Path], suffix: str, disguise: str
) -> None:
    model = disguised(originals, layout, suffix, disguise)
    before = snapshot(layout["inputs"])
    out = layout["root"] / "out"
    result = CliRunner().invoke(cli, ["run", str(model), "-q", "fp16", "-o", str(out)])
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {model}: "), result.stderr
    assert DISGUISES[disguise][1] in lines[0] and ("kernel" in lines[0] or "vars/0" in lines[0])
    assert "Traceback" not in result.output
    assert not out.exists() and not any(layout["tmp"].iterdir())
    assert snapshot(layout["inputs"]) == before


@pytest.mark.parametrize("disguise", DISGUISES)
def test_each_disguise_really_reaches_the_secret(
    originals: dict[str, Path], layout: dict[str, Path], disguise: str
) -> None:
    """Without the check, an HDF5 reader gets the secret as the kernel: the disguises are real.

    Keras itself reads the secret through external storage. It opens .h5 files
    through a Python file object, whose driver HDF5 reuses for the targets of
    external links and virtual datasets, so today those two only happen to miss
    (any other reader, or another Keras version, follows them)."""
    import h5py

    from compressor_frontends.keras import frameworks

    model = disguised(originals, layout, ".h5", disguise)
    with h5py.File(model, "r") as file:
        np.testing.assert_array_equal(file["model_weights/dense/dense/kernel:0"][()], SECRET_VALUES)
    if "external storage" in disguise:
        loaded = frameworks.keras().models.load_model(model, compile=False)
        np.testing.assert_array_equal(loaded.get_layer("dense").kernel.numpy(), SECRET_VALUES)


@pytest.mark.parametrize("trust", [False, True], ids=["default", "--trust"])
@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_the_secret_reaches_no_output(
    originals: dict[str, Path], layout: dict[str, Path], suffix: str, trust: bool
) -> None:
    """Every disguise, even with --trust: no file written anywhere holds the secret."""
    root = layout["root"]
    for index, disguise in enumerate(DISGUISES):
        model = disguised(originals, layout, suffix, disguise)
        out = root / f"out{index}"
        args = ["run", str(model), "-q", "fp16", "-o", str(out), *(["--trust"] if trust else [])]
        assert CliRunner().invoke(cli, args).exit_code == 3
    leaked = [
        path for path in root.rglob("*")
        if path.is_file() and path.name not in ("secret.bin", "secret.h5") and SECRET in path.read_bytes()
    ]
    assert leaked == [] and not any(layout["tmp"].iterdir())


def test_a_plain_model_still_loads(originals: dict[str, Path]) -> None:
    for suffix in (".h5", ".keras"):
        model = plugin.compressor_load(originals[suffix], "tflite", Context())
        assert model.handle.keras_model.get_layer("dense").kernel.shape == (4, 2)
    assert hdf5.inspect(originals[".h5"], originals[".h5"], trust=False, config=True)["class_name"]


def test_a_filter_from_a_plugin_library_needs_trust(
    originals: dict[str, Path], layout: dict[str, Path]
) -> None:
    """HDF5 dlopen()s unknown filters from HDF5_PLUGIN_PATH: code, so --trust."""
    import h5py

    def with_foreign_filter(file: Any) -> None:
        name = kernel_path(file)
        values = file[name][()]
        del file[name]
        # Filter 307 (bzip2) is registered with The HDF Group but not built into HDF5;
        # allow_unknown_filter lets h5py record it without having it.
        file.create_dataset(name, data=values, chunks=(4, 2), compression=307, allow_unknown_filter=True)

    model = edit_keras_weights(originals[".h5"], layout["inputs"] / "model.h5", with_foreign_filter)
    with h5py.File(model, "r") as file:
        assert file[kernel_path(file)].id.get_create_plist().get_filter(0)[0] == 307
    with pytest.raises(UnsafeInputError, match="filter 307.*--trust"):
        plugin.compressor_load(model, "tflite", Context())
    hdf5.inspect(model, model, trust=True)


def test_a_dataset_that_inflates_like_a_bomb_is_corrupt(
    originals: dict[str, Path], layout: dict[str, Path]
) -> None:
    """A compressed 128 MB dataset of zeros is refused before anything reads it."""

    def with_bomb(file: Any) -> None:
        file.create_dataset("bomb", shape=(32 << 20,), dtype="<f4", chunks=(1 << 20,), compression="gzip")
        file["bomb"][:] = 0

    model = edit_keras_weights(originals[".h5"], layout["inputs"] / "model.h5", with_bomb)
    assert model.stat().st_size < 2 << 20
    with pytest.raises(InvalidInputError, match=r"dataset '/bomb' reads as 134,217,728 bytes"):
        plugin.compressor_load(model, "tflite", Context())


def test_external_storage_names_stay_on_one_line(
    originals: dict[str, Path], layout: dict[str, Path]
) -> None:
    def newline_name(file: Any) -> None:
        _replace(file, lambda name: file.create_dataset(
            name, shape=(4, 2), dtype="<f4", external=[("a\nb.bin", 0, 32)]))

    model = edit_keras_weights(originals[".keras"], layout["inputs"] / "model.keras", newline_name)
    with pytest.raises(UnsafeInputError) as raised:
        plugin.compressor_load(model, "tflite", Context())
    assert "\n" not in str(raised.value) and "model.weights.h5: dataset" in str(raised.value)
    assert os.fspath(model) in str(raised.value)
