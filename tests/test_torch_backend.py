"""The torch backend: PyTorch models compressed with torchao and pruning, saved as
torch.export programs (or safetensors + manifest), measured by PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from compressor import Artifact, CompressionError, Context, Dataset, MeasureSettings, Step
from compressor.cli import cli

FACTORY = "test_torch_backend:two_heads"
ROWS, FEATURES = 48, 16


def two_heads() -> Any:
    """An MLP with two outputs: class scores and a score per example."""
    import torch

    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.ReLU())
            self.classes = torch.nn.Linear(32, 4)
            self.score = torch.nn.Linear(32, 1)

        def forward(self, x: Any) -> tuple[Any, Any]:
            hidden = self.body(x)
            return self.classes(hidden), self.score(hidden)

    return TwoHeads().eval()


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The two-head MLP's state_dict, labelled eval data (its own top-1) and the module."""
    import torch

    folder = tmp_path_factory.mktemp("heads")
    torch.manual_seed(0)
    module = two_heads()
    torch.save(module.state_dict(), folder / "heads.pt")
    x = np.random.default_rng(0).normal(size=(ROWS, FEATURES)).astype("float32")
    with torch.no_grad():
        labels = module(torch.from_numpy(x))[0].argmax(1).numpy()
    np.savez(folder / "eval.npz", x=x, y=labels)
    return {"model": folder / "heads.pt", "eval": folder / "eval.npz", "module": module, "x": x}


def _run(*args: str) -> Any:
    return CliRunner().invoke(cli, ["run", *args, "--min-seconds", "0", "--quiet"])


def _hook(name: str) -> Any:
    from compressor.plugins import get_host

    return get_host().hook_for("torch", name)


def _load(path: Path, **options: Any) -> Any:
    context = Context(options={"model_factory": FACTORY, **options})
    return _hook("compressor_load")(path=path, backend="torch", context=context), context


def _outputs_of(artifact: Artifact, x: np.ndarray) -> dict[str, np.ndarray]:
    runtime = _hook("compressor_open_runtime")(artifact=artifact, settings=MeasureSettings())
    return dict(runtime.run({"x": x}))


@pytest.mark.parametrize("damage", ["recipe", "specs", "quantization"])
def test_a_damaged_manifest_is_one_line(heads: dict[str, Any], tmp_path: Path, damage: str) -> None:
    model, context = _load(heads["model"], save_format="safetensors")
    context.eval_data = _dataset(heads)
    artifact = _hook("compressor_save")(model=model, destination=tmp_path / "m", context=context)
    manifest = json.loads(artifact.side_files[0].read_text())
    manifest[damage] = {"recipe": {"factory": 3}, "specs": [{"name": "x"}], "quantization": ["int3"]}[damage]
    artifact.side_files[0].write_text(json.dumps(manifest))
    result = _run(str(artifact.side_files[0]), "-o", str(tmp_path / "out"))  # identified by its suffix
    assert result.exit_code == 4, result.output
    assert "m.torch.json" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_onnx_and_torch_through_the_cli_against_the_one_torch_original(
        heads: dict[str, Any], tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[variants.dynamic]\nsteps = ["quantize dynamic"]\n'
                      '[variants.sparse-fp16]\nsteps = ["prune 0.5", "quantize fp16"]\n')
    out = tmp_path / "out"
    result = _run(str(heads["model"]), "--backend", "onnx,torch", "--set", f"model_factory={FACTORY}",
                  "--recipe", str(recipe), "--data", str(heads["eval"]), "-o", str(out))
    assert result.exit_code == 0, result.output
    merged = json.loads((out / "report.json").read_text())
    names = [v["name"] for v in merged["variants"]]
    assert names == [f"{backend}:{name}" for backend in ("onnx", "torch")
                     for name in ("original", "dynamic", "sparse-fp16")]
    assert merged["settings"]["reference"] == "torch:original"
    variants = {v["name"]: v for v in merged["variants"]}
    onnx_original = variants["onnx:original"]["metrics"]
    assert onnx_original["agreement"] == 1.0 and onnx_original["cosine"]["mean"] > 0.99999
    for name, variant in variants.items():
        metrics = variant["metrics"]
        assert set(metrics["outputs"]) == {"output_0", "output_1"}, name
        assert metrics["reference"] == "torch:original" and metrics["agreement"] >= 0.6, name
    torch_runs = json.loads((out / "torch" / "report.json").read_text())["variants"]
    for variant in torch_runs:
        assert (out / "torch" / f"{variant['name']}.pt2").is_file()
        assert variant["metrics"]["runtime"].startswith("torch ") and variant["metrics"]["torch_threads"] == 1
    assert torch_runs[0]["metrics"]["accuracy"] == 1.0
    assert torch_runs[1]["metrics"]["agreement"] >= 0.9
    sparse = torch_runs[2]
    assert sparse["metadata"]["pruned_layers"] == 3 and sparse["metrics"]["cosine"]["mean"] > 0.8
    assert any("torchao" in note for note in torch_runs[1]["notes"])


@pytest.mark.parametrize("mode", ["dynamic", "int8", "fp16"])
def test_the_saved_program_reloads_with_the_outputs_of_the_compressed_model(
        heads: dict[str, Any], tmp_path: Path, mode: str) -> None:
    import torch

    model, context = _load(heads["model"])
    steps = [Step("prune", {"sparsity": 0.5}), Step("quantize", {"mode": mode})]
    for step in steps:
        model = _hook("compressor_compress")(model=model, step=step, context=context)
    x = heads["x"][:8]
    net = model.handle
    with torch.inference_mode():
        tensor = torch.from_numpy(x).half() if mode == "fp16" else torch.from_numpy(x)
        expected = [t.float().numpy() for t in net.module(tensor)]
    context.eval_data = _dataset(heads)
    artifact = _hook("compressor_save")(model=model, destination=tmp_path / "saved", context=context)
    assert artifact.path.suffix == ".pt2"
    got = _outputs_of(artifact, x)
    assert list(got) == ["output_0", "output_1"]
    for name, want in zip(got, expected):
        np.testing.assert_allclose(got[name], want, rtol=1e-3, atol=1e-3)


def _dataset(heads: dict[str, Any]) -> Any:
    return Dataset(path=heads["eval"], features={"x": heads["x"]}, labels=None, size=ROWS)


def test_safetensors_and_manifest_rebuild_the_quantized_model(heads: dict[str, Any], tmp_path: Path) -> None:
    model, context = _load(heads["model"], save_format="safetensors")
    model = _hook("compressor_compress")(model=model, step=Step("quantize", {"mode": "dynamic"}), context=context)
    context.eval_data = _dataset(heads)
    artifact = _hook("compressor_save")(model=model, destination=tmp_path / "dyn", context=context)
    assert artifact.path.name == "dyn.safetensors" and artifact.side_files == (tmp_path / "dyn.torch.json",)
    manifest = json.loads((tmp_path / "dyn.torch.json").read_text())
    assert manifest["recipe"] == {"factory": FACTORY} and manifest["quantization"] == ["dynamic"]
    assert manifest["outputs"] == ["output_0", "output_1"]
    x = heads["x"][:5]
    from_runtime = _outputs_of(artifact, x)
    reloaded, _ = _load(tmp_path / "dyn.safetensors")  # the manifest next to it says how to rebuild
    import torch

    with torch.inference_mode():
        direct = [t.numpy() for t in reloaded.handle.module(torch.from_numpy(x))]
    np.testing.assert_allclose(from_runtime["output_0"], direct[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(CompressionError, match="already quantized"):
        _hook("compressor_compress")(model=reloaded, step=Step("quantize", {"mode": "fp16"}), context=context)


def test_a_transformers_folder_quantized_saved_and_reloaded(tmp_path: Path) -> None:
    import torch
    from onnx_fixtures import make_tiny_bert

    bert = make_tiny_bert(tmp_path / "bert")
    context = Context()
    model = _hook("compressor_load")(path=bert.folder, backend="torch", context=context)
    assert model.handle.recipe["transformers"] == "BertModel"
    model = _hook("compressor_compress")(model=model, step=Step("quantize", {"mode": "dynamic"}), context=context)
    data = dict(np.load(bert.eval))
    context.eval_data = Dataset(path=bert.eval, features=data, labels=None, size=len(data["input_ids"]))
    artifact = _hook("compressor_save")(model=model, destination=tmp_path / "bert-dynamic", context=context)
    assert artifact.path.suffix == ".pt2"
    runtime = _hook("compressor_open_runtime")(artifact=artifact, settings=MeasureSettings())
    assert [spec.name for spec in runtime.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    feeds = {name: array[:3, :9] for name, array in data.items()}  # another batch and length
    got = runtime.run(feeds)
    assert list(got) == ["last_hidden_state", "pooler_output"]
    with torch.inference_mode():
        want = model.handle.module(**{name: torch.from_numpy(array) for name, array in feeds.items()})
    np.testing.assert_allclose(got["last_hidden_state"], want.last_hidden_state.numpy(), atol=1e-4)


def test_a_pickled_module_is_refused_without_trust(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "whole.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 2)), path)  # the module's classes, pickled
    out = tmp_path / "out"
    result = _run(str(path), "--backend", "torch", "-q", "dynamic", "-o", str(out))
    assert result.exit_code == 3, result.output
    assert "--trust" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_an_onnx_graph_is_sent_to_the_onnx_backend(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not read")
    result = _run(str(path), "--backend", "torch", "-o", str(tmp_path / "out"))
    assert result.exit_code == 5 and "use --backend onnx" in result.stderr


def test_prune_after_quantize_and_quantize_twice_are_refused(heads: dict[str, Any]) -> None:
    model, context = _load(heads["model"])
    model = _hook("compressor_compress")(model=model, step=Step("quantize", {"mode": "fp16"}), context=context)
    with pytest.raises(CompressionError, match="prune before quantize"):
        _hook("compressor_compress")(model=model, step=Step("prune", {"sparsity": 0.5}), context=context)


def test_identifying_claims_only_the_manifest_and_imports_no_framework(tmp_path: Path) -> None:
    code = (
        "import sys, pathlib, compressor_torch.plugin as p; list(p.compressor_backends())\n"
        "names = ['m.pt', 'm.pth', 'm.pt2', 'm.safetensors', 'm.onnx', 'm.bin', 'm.torch.json']\n"
        "print([p.compressor_identify(pathlib.Path(n)) for n in names])\n"
        "print([m for m in ('torch', 'torchao', 'transformers', 'safetensors') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[:2] == [str([None] * 6 + ["torch"]), "[]"]


MARKER_VARIABLE = "COMPRESSOR_TEST_FACTORY_MARKER"
MARKING_FACTORY = "test_torch_backend:marking_heads"


def marking_heads() -> Any:
    """:func:`two_heads`, leaving a file behind: proof that a factory ran."""
    import os

    Path(os.environ[MARKER_VARIABLE]).write_text("ran")
    return two_heads()


def _saved_as_safetensors(heads: dict[str, Any], folder: Path, factory: str) -> Path:
    """The two-head MLP saved as safetensors, its manifest naming ``factory``."""
    model, context = _load(heads["model"], save_format="safetensors")
    context.eval_data = _dataset(heads)
    artifact = _hook("compressor_save")(model=model, destination=folder / "m", context=context)
    manifest = json.loads(artifact.side_files[0].read_text())
    manifest["recipe"] = {"factory": factory}
    artifact.side_files[0].write_text(json.dumps(manifest))
    return artifact.path


def test_a_factory_a_manifest_names_runs_only_once_the_user_names_it(
        heads: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_VARIABLE, str(marker))
    weights = _saved_as_safetensors(heads, tmp_path, MARKING_FACTORY)
    result = _run(str(weights), "--backend", "torch", "-q", "dynamic", "-o", str(tmp_path / "out"))
    assert result.exit_code == 3, result.output
    assert not marker.exists()  # the file's factory was never imported, let alone called
    (line,) = result.stderr.strip().splitlines()
    assert "m.torch.json" in line and f"--set model_factory={MARKING_FACTORY}" in line and "--trust" in line
    assert not (tmp_path / "out").exists()
    # The user naming the same factory confirms it; --trust accepts the file's word.
    x = heads["x"][:5]
    for options, trust in (({"model_factory": MARKING_FACTORY}, False), ({}, True)):
        marker.unlink(missing_ok=True)
        model = _hook("compressor_load")(path=weights, backend="torch", context=Context(options=options, trust=trust))
        assert marker.exists() and model.handle.recipe == {"factory": MARKING_FACTORY}
        import torch

        with torch.inference_mode():
            np.testing.assert_allclose(model.handle.module(torch.from_numpy(x))[0].numpy(),
                                       heads["module"](torch.from_numpy(x))[0].numpy(), rtol=1e-5, atol=1e-6)


def test_the_users_own_factory_wins_over_the_manifests(
        heads: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "marker"
    monkeypatch.setenv(MARKER_VARIABLE, str(marker))
    weights = _saved_as_safetensors(heads, tmp_path, MARKING_FACTORY)
    model, _ = _load(weights)  # model_factory=FACTORY, not the manifest's
    assert model.handle.recipe == {"factory": FACTORY} and not marker.exists()


@pytest.mark.parametrize("factory,error", [("json:loads", "TypeError"), ("math:sqrt", "TypeError"),
                                           ("json:no_such_function", None)])
def test_a_factory_that_raises_is_exit_2_naming_it(heads: dict[str, Any], tmp_path: Path, factory: str,
                                                   error: str | None) -> None:
    result = _run(str(heads["model"]), "--backend", "torch", "--set", f"model_factory={factory}",
                  "-o", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert repr(factory) in line and (error is None or f"raised {error}" in line)


@pytest.fixture(scope="module")
def bert_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT saved by this backend as safetensors + a manifest naming its class and config."""
    from onnx_fixtures import make_tiny_bert

    folder = tmp_path_factory.mktemp("bert-manifest")
    bert = make_tiny_bert(folder / "bert")
    context = Context(options={"save_format": "safetensors"})
    model = _hook("compressor_load")(path=bert.folder, backend="torch", context=context)
    data = dict(np.load(bert.eval))
    context.eval_data = Dataset(path=bert.eval, features=data, labels=None, size=len(data["input_ids"]))
    artifact = _hook("compressor_save")(model=model, destination=folder / "bert", context=context)
    return artifact.path


def _with_config(weights: Path, folder: Path, **config: Any) -> Path:
    import shutil

    from compressor_torch.loading import manifest_path

    folder.mkdir()
    copy = folder / weights.name
    shutil.copy(weights, copy)
    manifest = json.loads(manifest_path(weights).read_text())
    manifest["recipe"]["config"].update(config)
    manifest_path(copy).write_text(json.dumps(manifest))
    return copy


def test_a_manifest_config_far_larger_than_its_weights_is_refused_before_building(
        bert_manifest: Path, tmp_path: Path) -> None:
    from compressor_torch.loading import manifest_path

    assert json.loads(manifest_path(bert_manifest).read_text())["recipe"]["transformers"] == "BertModel"
    reloaded = _hook("compressor_load")(path=bert_manifest, backend="torch", context=Context())
    assert reloaded.handle.recipe["transformers"] == "BertModel"  # a transformers class needs no confirming
    # 10^9 tokens x 32 wide: 32 G parameters, 128 GB to allocate, for a file of a few hundred KB.
    huge = _with_config(bert_manifest, tmp_path / "huge", vocab_size=10**9)
    result = _run(str(huge), "--backend", "torch", "-o", str(tmp_path / "out"))
    assert result.exit_code == 4, result.output
    (line,) = result.stderr.strip().splitlines()
    assert "bert.safetensors" in line and "32,000," in line and "not this file's model" in line


def test_a_manifest_model_larger_than_memory_is_exit_2(
        bert_manifest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from compressor import UsageError
    from compressor_torch import loading

    monkeypatch.setattr(loading, "available_memory", lambda: 10_000)
    with pytest.raises(UsageError, match=r"needs .* of memory, 0\.0 MB available"):
        _hook("compressor_load")(path=bert_manifest, backend="torch", context=Context())


def test_a_saved_program_carries_none_of_the_users_data(heads: dict[str, Any], tmp_path: Path) -> None:
    import zipfile

    model, context = _load(heads["model"])
    x = heads["x"]
    context.eval_data = _dataset(heads)  # the export's example rows come from here
    artifact = _hook("compressor_save")(model=model, destination=tmp_path / "saved", context=context)
    archive = artifact.path.read_bytes()
    for row in x[:4]:
        assert row.tobytes() not in archive
        assert row[:4].tobytes() not in archive  # not even 16 bytes of it
    with zipfile.ZipFile(artifact.path) as opened:
        samples = [info for info in opened.infolist() if "sample_inputs" in info.filename]
    assert samples and all(info.file_size < 2048 for info in samples)
    got = _outputs_of(artifact, x[:6])  # and it still loads and runs
    import torch

    with torch.inference_mode():
        want = heads["module"](torch.from_numpy(x[:6]))
    np.testing.assert_allclose(got["output_0"], want[0].numpy(), rtol=1e-5, atol=1e-5)
