"""The onnx backend's loader refuses unsafe and broken inputs before any framework reads them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from onnx_fixtures import FACTORY, set_external_location, tiny_onnx_with_external_data

from compressor import Context, InvalidInputError, UnsafeInputError
from compressor.cli import cli
from compressor_onnx import plugin


class CreatesMarker:
    """Unpickling this opens (creates) a file: code execution a loader must not allow."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def load(path: Path, trust: bool = False, **options: object) -> object:
    defaults = {key: param.default for key, param in plugin.backend().options.items()}
    return plugin.compressor_load(path, "onnx", Context(options={**defaults, **options}, trust=trust))


def test_pickle_payload_never_runs_without_trust(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": CreatesMarker(marker)}, path)
    with pytest.raises(UnsafeInputError, match="--trust"):
        load(path, model_factory=FACTORY)
    assert not marker.exists()
    # The payload is real: trusting the file runs it (and the result is not a model).
    with pytest.raises(InvalidInputError):
        load(path, trust=True, model_factory=FACTORY)
    assert marker.exists()


def test_full_module_pickle_needs_trust(tmp_path: Path) -> None:
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(4, 2), path)
    with pytest.raises(UnsafeInputError, match="--trust"):
        load(path)
    model = load(path, trust=True, input_shape="1,4")
    assert model.handle.torch.module.out_features == 2


def test_torchscript_needs_trust_and_then_exports(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())).save(path)
    with pytest.raises(UnsafeInputError, match="TorchScript.*--trust"):
        load(path, input_shape="1,4")
    context = Context(options={"input_shape": "1,4", "opset": 17}, trust=True)
    model = plugin.compressor_load(path, "onnx", context)
    artifact = plugin.compressor_save(model, tmp_path / "scripted", context)
    assert artifact.path.stat().st_size > 0


def test_cli_exit_code_3_and_no_output_for_unsafe_input(tmp_path: Path) -> None:
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(4, 2), path)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(path), "-o", str(out), "-q", "dynamic"])
    assert result.exit_code == 3
    assert "--trust" in result.output
    assert not out.exists()


def test_external_data_inside_the_folder_loads(tmp_path: Path) -> None:
    path = tiny_onnx_with_external_data(tmp_path / "model")
    model = load(path)
    weight = model.handle.graph.graph.initializer[0]
    assert weight.data_location == 0 and len(weight.raw_data) == 8 * 4 * 4


@pytest.mark.parametrize("location", ["/etc/passwd", "../outside.bin", "sub/../../outside.bin"])
def test_external_data_escaping_the_folder_is_refused(tmp_path: Path, location: str) -> None:
    path = tiny_onnx_with_external_data(tmp_path / "model")
    (tmp_path / "outside.bin").write_bytes(bytes(256))
    set_external_location(path, location)
    with pytest.raises(UnsafeInputError, match="folder|absolute"):
        load(path)


def test_external_data_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    path = tiny_onnx_with_external_data(tmp_path / "model")
    outside = tmp_path / "secret.bin"
    outside.write_bytes(bytes(256))
    os.symlink(outside, path.parent / "link.bin")
    set_external_location(path, "link.bin")
    with pytest.raises(UnsafeInputError, match="symlink"):
        load(path)


def test_external_data_missing_or_short_is_invalid(tmp_path: Path) -> None:
    path = tiny_onnx_with_external_data(tmp_path / "model")
    data = path.parent / "weights.bin"
    data.write_bytes(data.read_bytes()[:50])
    with pytest.raises(InvalidInputError, match="shorter"):
        load(path)
    data.unlink()
    with pytest.raises(InvalidInputError, match="missing"):
        load(path)


def _valid_bytes(suffix: str, folder: Path) -> bytes:
    """A valid file of each format, to truncate."""
    source = folder / f"valid{suffix}"
    module = torch.nn.Linear(4, 2)
    if suffix == ".onnx":
        torch.onnx.export(module, (torch.zeros(1, 4),), str(source), dynamo=False)
    elif suffix == ".pt2":
        torch.export.save(torch.export.export(module, (torch.zeros(1, 4),)), source)
    elif suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(module.state_dict(), str(source))
    else:
        torch.save(module.state_dict(), source)
    return source.read_bytes()


@pytest.mark.parametrize("suffix", [".onnx", ".pt", ".pt2", ".safetensors"])
def test_empty_truncated_and_random_files_are_invalid(tmp_path: Path, suffix: str) -> None:
    valid = _valid_bytes(suffix, tmp_path)
    variants = {
        "empty": b"",
        "truncated": valid[: len(valid) // 2],
        "random": np.random.default_rng(0).bytes(len(valid)),
    }
    for name, content in variants.items():
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(content)
        with pytest.raises(InvalidInputError):
            load(path, model_factory="torch.nn:Identity")


def test_cli_exit_code_4_for_a_corrupt_model(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07garbage" * 10)
    before = path.read_bytes()
    result = CliRunner().invoke(cli, ["run", str(path), "-o", str(tmp_path / "out"), "-q", "dynamic"])
    assert result.exit_code == 4, result.output
    assert "broken.onnx" in result.output
    assert not (tmp_path / "out").exists()
    assert path.read_bytes() == before


@pytest.mark.parametrize("factory", ["json:loads", "test_onnx_safety:raising_factory"])
def test_a_factory_that_raises_is_a_usage_error_naming_it(tmp_path: Path, factory: str) -> None:
    from compressor import UsageError

    path = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), path)
    with pytest.raises(UsageError) as caught:
        load(path, model_factory=factory)
    message = str(caught.value)
    assert caught.value.exit_code == 2 and "\n" not in message
    assert f"model_factory {factory!r} raised" in message
    assert ("TypeError" if factory == "json:loads" else "RuntimeError: no weights today") in message


def raising_factory() -> torch.nn.Module:
    raise RuntimeError("no weights today\nsecond line")
