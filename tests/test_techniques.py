"""``lowrank`` and ``prune structure=channel`` on the onnx and tflite backends, with real
torch, onnx, ONNX Runtime and TensorFlow: the saved artifacts really have the smaller
shapes, run with bounded (or, on models built for it, no) output error, chain with
quantization, and bad requests are refused before any work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx_fixtures import make_tiny_bert
from tflite_fixtures import KerasFiles, shared_digits_files

from compressor import Context, Step
from compressor.builtin import read_npz
from compressor.cli import cli
from compressor.validation import validate_step
from compressor_frontends.pytorch.export import LARGE_MODEL_VARIABLE
from compressor_onnx import plugin as onnx_plugin
from compressor_tflite import frameworks
from compressor_tflite import plugin as tflite_plugin

FAST = ["--min-seconds", "0"]
WIDTHS = (64, 96, 80, 10)


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(arg) for arg in args])
    return result.exit_code, result.output


def variants(out: Path) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in json.loads((out / "report.json").read_text())["variants"]}


def shapes(path: Path) -> dict[str, list[int]]:
    return {tensor.name: list(tensor.dims) for tensor in onnx.load(str(path)).graph.initializer}


def run_onnx(path: Path | Any, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    source = str(path) if isinstance(path, Path) else path.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def mlp_onnx(path: Path, zeroed: int = 0, rank: int | None = None, seed: int = 0) -> Path:
    """An MLP in the two forms exporters write for Linear layers: MatMul + Add bias, and Gemm
    (transB) with its bias, each + Relu. ``zeroed``: that many outputs of each hidden layer have
    zero weights and bias (pruning exactly them changes nothing); ``rank``: hidden weights of
    exactly that rank."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, tensors, current = [], [], "x"
    for index, (inner, outer) in enumerate(zip(WIDTHS, WIDTHS[1:])):
        last = index == len(WIDTHS) - 2
        weight = rng.standard_normal((inner, outer)) / np.sqrt(inner)
        if rank is not None and not last:
            weight = rng.standard_normal((inner, rank)) @ rng.standard_normal((rank, outer)) / np.sqrt(inner * rank)
        bias = rng.standard_normal(outer) * 0.1
        if zeroed and not last:
            weight[:, :zeroed], bias[:zeroed] = 0, 0
            order = rng.permutation(outer)
            weight, bias = weight[:, order], bias[order]
        linear = f"z{index}"
        if index % 2:
            tensors.append(numpy_helper.from_array(np.ascontiguousarray(weight.T, dtype=np.float32), f"w{index}"))
            nodes.append(helper.make_node("Gemm", [current, f"w{index}", f"b{index}"], [linear], transB=1,
                                          name=f"gemm{index}"))
        else:
            tensors.append(numpy_helper.from_array(weight.astype(np.float32), f"w{index}"))
            nodes += [helper.make_node("MatMul", [current, f"w{index}"], [f"m{index}"], name=f"matmul{index}"),
                      helper.make_node("Add", [f"m{index}", f"b{index}"], [linear], name=f"add{index}")]
        tensors.append(numpy_helper.from_array(bias.astype(np.float32), f"b{index}"))
        current = "logits" if last else f"h{index}"
        nodes.append(helper.make_node("Identity" if last else "Relu", [linear], [current]))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTHS[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", WIDTHS[-1]])], tensors)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    x = np.random.default_rng(1).standard_normal((96, WIDTHS[0])).astype(np.float32)
    path = tmp_path_factory.mktemp("data") / "eval.npz"
    np.savez(path, x=x)
    return path, x


def onnx_step(technique: str, **params: Any) -> Step:
    return validate_step(onnx_plugin.backend(), Step(technique, params))


def onnx_compress(path: Path, steps: list[Step], folder: Path) -> tuple[Any, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    context = Context(options={key: p.default for key, p in onnx_plugin.backend().options.items()}, workdir=folder)
    model = onnx_plugin.compressor_load(path, "onnx", context)
    for step in steps:
        model = onnx_plugin.compressor_compress(model, step, context)
    return model, onnx_plugin.compressor_save(model, folder / "saved", context).path


def test_declarations() -> None:
    for backend in (onnx_plugin.backend(), next(tflite_plugin.compressor_backends())):
        lowrank, prune = backend.techniques["lowrank"], backend.techniques["prune"]
        assert lowrank.candidates == ("lowrank energy=0.99", "lowrank energy=0.95", "lowrank energy=0.9")
        assert prune.params["structure"].default == "unstructured"
        assert prune.candidates[1] == "prune 0.5 structure=channel"
        assert {"rank", "energy", "layers", "min_size"} <= set(lowrank.params)


def test_onnx_lowrank_cli(tmp_path: Path, data: tuple[Path, np.ndarray]) -> None:
    model = mlp_onnx(tmp_path / "mlp.onnx", rank=8)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[variants.exact]\nsteps = ["lowrank rank=12 min_size=0"]\n'
                      '[variants.energy-dynamic]\nsteps = ["lowrank energy=0.9", "quantize dynamic"]\n')
    code, output = invoke("run", model, "--recipe", recipe, "--data", data[0], "-o", tmp_path / "out", *FAST)
    assert code == 0, output
    report = variants(tmp_path / "out")
    facts = report["exact"]["metadata"]["lowrank"]
    assert [(e["layer"], e["rank"]) for e in facts["factorized"]] == [("matmul0", 12), ("gemm1", 12)]
    assert facts["skipped"] == [{"layer": "matmul2", "shape": [80, 10],
                                 "reason": "rank 12 is not below the matrix's (10)"}]
    saved = shapes(tmp_path / "out" / report["exact"]["artifact"])
    assert saved["w0_lowrank_a"] == [64, 12] and saved["w0_lowrank_b"] == [12, 96]
    assert saved["w1_lowrank_a"] == [96, 12] and saved["w1_lowrank_b"] == [12, 80]  # the Gemm's transB undone
    assert "w0" not in saved and "w1" not in saved and saved["w2"] == [80, 10]
    # The hidden weights have rank 8: rank 12 loses nothing.
    np.testing.assert_allclose(run_onnx(tmp_path / "out" / report["exact"]["artifact"], data[1]),
                               run_onnx(model, data[1]), atol=1e-4)
    chained = report["energy-dynamic"]
    assert all(e["rank"] <= 8 for e in chained["metadata"]["lowrank"]["factorized"])
    assert "lowrank energy=0.9: 2 weight(s) factorized" in chained["notes"][0]
    assert "matmul2" in json.dumps(chained["metadata"]["lowrank"]["skipped"])  # under min_size
    graph = onnx.load(str(tmp_path / "out" / chained["artifact"]))
    assert "DynamicQuantizeLinear" in {node.op_type for node in graph.graph.node}
    assert chained["metrics"]["cosine"]["mean"] > 0.9  # 90% of the energy of random weights


def test_onnx_channel_pruning_cli(tmp_path: Path, data: tuple[Path, np.ndarray]) -> None:
    model = mlp_onnx(tmp_path / "mlp.onnx", zeroed=48)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[variants.channel]\nsteps = ["prune 0.5"]\n')
    code, output = invoke("run", model, "--recipe", recipe, "--prune", "0.5", "-q", "dynamic",
                          "--set", "structure=channel", "--data", data[0], "-o", tmp_path / "out", *FAST)
    assert code == 0, output
    report = variants(tmp_path / "out")
    facts = report["channel"]["metadata"]["channel_pruning"]
    assert [(e["layer"], e["next"], e["channels"], e["kept"]) for e in facts["pruned"]] == [
        ("matmul0", "gemm1", 96, 48), ("gemm1", "matmul2", 80, 40)]
    assert facts["not_pruned"] == [{"layer": "matmul2", "reason": "logits is a model output"}]
    saved = shapes(tmp_path / "out" / report["channel"]["artifact"])
    assert saved == {"w0": [64, 48], "b0": [48], "w1": [40, 48], "b1": [40], "w2": [40, 10], "b2": [10]}
    # The lowest-norm outputs were exactly the zeroed ones: nothing changes.
    np.testing.assert_allclose(run_onnx(tmp_path / "out" / report["channel"]["artifact"], data[1]),
                               run_onnx(model, data[1]), atol=1e-5)
    assert report["channel"]["metrics"]["agreement"] == 1.0
    both = report["prune0.5-dynamic"]
    assert both["steps"] == ["prune 0.5 structure=channel", "quantize dynamic"]
    assert both["metrics"]["agreement"] > 0.9
    assert both["metrics"]["size_bytes"] < report["channel"]["metrics"]["size_bytes"] / 2


def test_onnx_channel_pruning_of_convolutions(tmp_path: Path) -> None:
    import torch

    torch.manual_seed(0)
    network = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(128, 10),
    ).eval()
    with torch.no_grad():
        for conv in (network[0], network[3]):
            conv.weight[1::2] = 0
            conv.bias[1::2] = 0
    x = torch.rand(6, 1, 8, 8)
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(network, (x,), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}}, opset_version=17, dynamo=False)
    pruned, saved = onnx_compress(path, [onnx_step("prune", sparsity=0.5, structure="channel")], tmp_path)
    dims = sorted(dims for dims in shapes(saved).values() if len(dims) > 1)
    assert dims == [[4, 1, 3, 3], [4, 4, 3, 3], [10, 64]]  # the Linear lost every position of 4 channels
    np.testing.assert_allclose(run_onnx(saved, x.numpy()), network(x).detach().numpy(), atol=1e-5)
    assert len(pruned.metadata["channel_pruning"]["pruned"]) == 2


def test_onnx_large_models_are_rewritten_on_disk(tmp_path: Path, data: tuple[Path, np.ndarray],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    rank_model, zeroed_model = mlp_onnx(tmp_path / "rank.onnx", rank=8), mlp_onnx(tmp_path / "zero.onnx", zeroed=48)
    monkeypatch.setenv(LARGE_MODEL_VARIABLE, "1000")
    cases = ((rank_model, onnx_step("lowrank", rank=8, min_size=1000), "w0_lowrank_a", [64, 8]),
             (zeroed_model, onnx_step("prune", sparsity=0.5, structure="channel"), "w1", [40, 48]))
    for source, step, name, expected in cases:
        folder = tmp_path / step.technique
        model, saved = onnx_compress(source, [step, onnx_step("quantize", mode="fp16")], folder)
        assert model.handle.path is not None and model.handle.graph is None
        assert saved.with_name(saved.name + ".data").is_file()
        skeleton = onnx.load(str(saved), load_external_data=False)
        assert [list(t.dims) for t in skeleton.graph.initializer if t.name == name] == [expected]
        np.testing.assert_allclose(run_onnx(saved, data[1]), run_onnx(source, data[1]), atol=0.05)


def test_onnx_transformers_model(tmp_path: Path) -> None:
    bert = make_tiny_bert(tmp_path / "bert")
    ffn = "*/intermediate/dense/*,*/layer.?/output/dense/*"
    context = Context(options={key: p.default for key, p in onnx_plugin.backend().options.items()},
                      workdir=tmp_path)
    model = onnx_plugin.compressor_load(bert.folder, "onnx", context)
    context.eval_data = read_npz(bert.eval, model.inputs)
    factorized = onnx_plugin.compressor_compress(model, onnx_step("lowrank", rank=4, layers=ffn, min_size=0), context)
    layers = [entry["layer"] for entry in factorized.metadata["lowrank"]["factorized"]]
    assert sorted(layers) == sorted(f"/module/encoder/layer.{i}/{part}/dense/MatMul"
                                    for i in (0, 1) for part in ("intermediate", "output"))
    narrowed = onnx_plugin.compressor_compress(model, onnx_step("prune", sparsity=0.5, structure="channel"), context)
    facts = narrowed.metadata["channel_pruning"]
    # The feed-forward blocks (dense -> GELU as Erf arithmetic -> dense) lose half their 64 units;
    # Q, K, V and the attention output feed reshapes and residual adds: listed, not pruned.
    assert [(e["channels"], e["kept"]) for e in facts["pruned"]] == [(64, 32), (64, 32)]
    assert any("Reshape" in e["reason"] for e in facts["not_pruned"])
    features = {name: np.asarray(array) for name, array in context.eval_data.features.items()}
    for variant in (factorized, narrowed):
        saved = onnx_plugin.compressor_save(variant, tmp_path / variant.notes[-1][:7], context).path
        import onnxruntime as ort

        session = ort.InferenceSession(str(saved), providers=["CPUExecutionProvider"])
        feeds = {i.name: features[i.name] for i in session.get_inputs()}
        assert session.run(None, feeds)[0].shape == (24, 16, bert.hidden_size)


@pytest.mark.parametrize("args,code,message", [
    (["--recipe", "energy=0"], 2, "energy='0' is below the minimum"),
    (["--recipe", "energy=1.5"], 2, "above the maximum 1"),
    (["--recipe", "rank=0"], 2, "rank='0' is below the minimum 1"),
    (["--prune", "0.5", "--set", "structure=head"], 5, "structure=head (attention heads of transformers models) is on the onnx backend"),
    (["--prune", "0.5", "--set", "structure=rows"], 2, "is not one of: unstructured, channel"),
])
def test_bad_requests_are_refused_before_loading(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    if args[0] == "--recipe":
        recipe = tmp_path / "recipe.toml"
        recipe.write_text(f'[variants.v]\nsteps = ["lowrank {args[1]}"]\n')
        args = ["--recipe", str(recipe)]
    # Unreadable models: had they been loaded first, the exit code would be 4. Head pruning
    # is the onnx backend's (on transformers models), so only tflite refuses it unloaded.
    for name in ("model.h5",) if "structure=head" in args else ("model.onnx", "model.h5"):
        model = tmp_path / name
        model.write_bytes(b"not a model" * 10)
        exit_code, output = invoke("run", model, *args, "-o", tmp_path / "out")
        assert exit_code == code, output
        assert message in output and len(output.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()


def test_lowrank_needs_rank_or_energy(tmp_path: Path, data: tuple[Path, np.ndarray]) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[variants.v]\nsteps = ["lowrank min_size=0"]\n')
    code, output = invoke("run", mlp_onnx(tmp_path / "m.onnx"), "--recipe", recipe, "-o", tmp_path / "out")
    assert code == 2 and "exactly one of rank=R" in output


# --- tflite -----------------------------------------------------------------------------


def zeroed_cnn(folder: Path) -> tuple[Path, np.ndarray]:
    """A Keras CNN whose odd conv filters and dense units are zero (weights and bias)."""
    keras = frameworks.keras()
    keras.utils.set_random_seed(3)
    layers = keras.layers
    inputs = keras.Input((8, 8, 1), name="image")
    hidden = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_a")(inputs)
    hidden = layers.MaxPooling2D(name="pool")(hidden)
    hidden = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_b")(hidden)
    hidden = layers.Flatten(name="flat")(hidden)
    hidden = layers.Dense(16, activation="relu", name="dense_a")(hidden)
    hidden = layers.Dropout(0.2, name="drop")(hidden)
    model = keras.Model(inputs, layers.Dense(10, activation="softmax", name="digit")(hidden))
    for name in ("conv_a", "conv_b", "dense_a"):
        kernel, bias = model.get_layer(name).get_weights()
        kernel[..., 1::2], bias[1::2] = 0, 0
        model.get_layer(name).set_weights([kernel, bias])
    path = folder / "zeroed.keras"
    model.save(path)
    return path, np.random.default_rng(4).random((16, 8, 8, 1)).astype(np.float32)


def test_tflite_channel_pruning_is_exact_on_zeroed_channels(tmp_path: Path) -> None:
    path, x = zeroed_cnn(tmp_path)
    model = tflite_plugin.compressor_load(path, "tflite", Context())
    step = validate_step(next(tflite_plugin.compressor_backends()),
                         Step("prune", {"sparsity": 0.5, "structure": "channel"}))
    pruned = tflite_plugin.compressor_compress(model, step, Context())
    narrowed = pruned.handle.keras_model
    kernels = {layer.name: layer.get_weights()[0].shape for layer in narrowed.layers if layer.get_weights()}
    assert kernels == {"conv_a": (3, 3, 1, 4), "conv_b": (3, 3, 4, 4), "dense_a": (64, 8), "digit": (8, 10)}
    assert "no fine-tuning (no --train-data)" in pruned.notes[-1]
    np.testing.assert_allclose(narrowed.predict(x, verbose=0), model.handle.keras_model.predict(x, verbose=0),
                               atol=1e-5)
    artifact = tflite_plugin.compressor_save(pruned, tmp_path / "narrow", Context())
    interpreter = frameworks.interpreter_class()[0](model_path=str(artifact.path))
    interpreter.allocate_tensors()
    constant_shapes = {tuple(d["shape"]) for d in interpreter.get_tensor_details() if len(d["shape"]) == 4}
    assert (4, 3, 3, 4) in constant_shapes and (8, 3, 3, 4) not in constant_shapes  # TFLite's OHWI filters


@pytest.fixture(scope="module")
def files() -> KerasFiles:
    return shared_digits_files()


def test_tflite_chains_with_fine_tuning_cli(files: KerasFiles, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[variants.channel-dynamic]\nsteps = ["prune 0.5 structure=channel epochs=2", '
                      '"quantize dynamic"]\n[variants.lowrank-dynamic]\nsteps = ["lowrank energy=0.9 epochs=1", '
                      '"quantize dynamic"]\n')
    out = tmp_path / "out"
    code, output = invoke("run", files.keras, "--recipe", recipe, "--train-data", files.train,
                          "--data", files.eval, "-o", out, *FAST)
    assert code == 0, output
    report = variants(out)
    original = report["original"]["metrics"]
    channel, lowrank = report["channel-dynamic"], report["lowrank-dynamic"]
    assert "fine-tuned 2 epoch(s) on train.npz" in channel["notes"][0]
    assert [(e["channels"], e["kept"]) for e in channel["metadata"]["channel_pruning"]["pruned"]] == [
        (8, 4), (16, 8), (96, 48)]
    # Keras numbers layer names per process ("dense", "dense_7"): the first Dense is factorized.
    assert lowrank["metadata"]["lowrank"]["factorized"][0]["layer"].startswith("dense")
    for variant in (channel, lowrank):
        assert variant["metrics"]["accuracy"] > original["accuracy"] - 0.05
        assert variant["metrics"]["size_bytes"] < original["size_bytes"] / 3
    interpreter = frameworks.interpreter_class()[0](model_path=str(out / channel["artifact"]))
    two_d = {tuple(d["shape"]) for d in interpreter.get_tensor_details() if len(d["shape"]) == 2}
    assert (48, 128) in two_d and (96, 256) not in two_d  # Dense kernels as [units, inputs]
