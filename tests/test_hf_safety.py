"""Hugging Face folders a loader must refuse, each in one line with its documented code:
configs nested past the recursion limit (4), custom code through ``auto_map`` and a
shard index naming files outside the folder (3, nothing run or read)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from compressor.cli import cli

NESTED = '{"deep": ' + "[" * 100_000 + "]" * 100_000 + "}"


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from onnx_fixtures import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("hf") / "bert").folder


def _copy(bert: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(bert, folder)
    return folder


def _run(folder: Path, tmp_path: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["run", str(folder), "-q", "dynamic", "-o", str(tmp_path / "out"),
                                      "--min-seconds", "0", "--quiet", *extra])
    assert not (tmp_path / "out").exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.output
    return result.exit_code, lines[0]


@pytest.mark.parametrize("backend", ["onnx", "torch"])
@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_a_config_nested_past_the_recursion_limit_is_exit_4(bert: Path, tmp_path: Path, name: str,
                                                            backend: str) -> None:
    folder = _copy(bert, tmp_path)
    if name == "config.json":
        config = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps(config)[:-1] + ', "deep": ' + NESTED[9:-1] + "}")
    else:
        (folder / name).write_text(NESTED)
    code, line = _run(folder, tmp_path, "--backend", backend)
    assert code == 4 and f"has a {name} nested too deeply" in line


def test_auto_map_custom_code_is_refused_as_unsafe_and_never_runs(bert: Path, tmp_path: Path) -> None:
    folder = _copy(bert, tmp_path)
    marker = tmp_path / "marker"
    (folder / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["CustomModel"], auto_map={"AutoModel": "modeling_custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    code, line = _run(folder, tmp_path)
    assert code == 3 and "auto_map" in line and "model" in line
    assert not marker.exists()


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/elsewhere.safetensors", "sub/../../x.safetensors",
                                   "link.safetensors"])
def test_a_shard_index_naming_files_outside_the_folder_is_refused(bert: Path, tmp_path: Path, shard: str) -> None:
    folder = _copy(bert, tmp_path)
    weights = folder / "model.safetensors"
    outside = tmp_path / "outside.safetensors"
    shutil.move(weights, outside)
    (folder / "link.safetensors").symlink_to(outside)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "embeddings.word_embeddings.weight": shard}}))
    code, line = _run(folder, tmp_path)
    assert code == 3 and "model.safetensors.index.json points at" in line and "outside" in line


def test_a_shard_index_inside_the_folder_still_loads(bert: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _copy(bert, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in halves.items():
        save_file({key: tensors[key] for key in keys}, str(folder / shard), metadata={"format": "pt"})
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        key: shard for shard, keys in halves.items() for key in keys}}))
    from compressor_frontends.pytorch.hf import load_transformers

    network, _ = load_transformers(folder, ())
    assert sum(p.numel() for p in network.module.parameters()) == sum(t.numel() for t in tensors.values())
