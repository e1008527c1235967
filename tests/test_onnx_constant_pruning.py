"""``prune`` and ``prune structure=channel`` on a graph whose weights and biases are
``Constant`` nodes (as older exporters, Paddle and TensorFlow write them) instead of
initializers: they said "no Linear/Conv weights"; now the weights are made initializers
first, as quantization does, and pruned. Real onnx and ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx_fixtures import compress_with

from compressor_onnx import plugin
from compressor_onnx.pruning import sparsity_of


def constant_mlp(path: Path) -> dict[str, np.ndarray]:
    """x [N, 16] -> MatMul -> Add -> Relu -> MatMul -> Add -> y [N, 8], every weight and bias
    a Constant node; the arrays."""
    rng = np.random.default_rng(0)
    arrays = {"w1": rng.standard_normal((16, 32)).astype(np.float32) * rng.uniform(0.1, 2, 32).astype(np.float32),
              "b1": rng.standard_normal(32).astype(np.float32),
              "w2": rng.standard_normal((32, 8)).astype(np.float32), "b2": rng.standard_normal(8).astype(np.float32)}
    nodes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))
             for name, array in arrays.items()]
    nodes += [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
              helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
              helper.make_node("Relu", ["hb"], ["r"], name="relu"),
              helper.make_node("MatMul", ["r", "w2"], ["o"], name="fc2"),
              helper.make_node("Add", ["o", "b2"], ["y"], name="bias2")]
    graph = helper.make_graph(nodes, "constants", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return arrays


def run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_prune_lifts_constant_node_weights_and_prunes_them(tmp_path: Path) -> None:
    arrays = constant_mlp(tmp_path / "constants.onnx")
    model, artifact = compress_with(plugin, "onnx", tmp_path / "constants.onnx", ["prune 0.5"], tmp_path / "out")
    assert model.metadata["pruned_layers"] == 2
    saved = onnx.load(str(artifact.path))
    weights = {tensor.name: numpy_helper.to_array(tensor) for tensor in saved.graph.initializer}
    assert sparsity_of(saved) == 0.5
    for name in ("w1", "w2"):  # each layer's smallest half is zero, the rest as it was
        kept = weights[name] != 0
        assert np.array_equal(weights[name][kept], arrays[name][kept])
        assert np.abs(arrays[name][~kept]).max() <= np.abs(arrays[name][kept]).min()
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    expected = np.maximum(x @ weights["w1"] + arrays["b1"], 0) @ weights["w2"] + arrays["b2"]
    np.testing.assert_allclose(run(artifact.path, x), expected, rtol=1e-5, atol=1e-5)


def test_channel_pruning_lifts_constant_node_weights_and_biases(tmp_path: Path) -> None:
    arrays = constant_mlp(tmp_path / "constants.onnx")
    model, artifact = compress_with(plugin, "onnx", tmp_path / "constants.onnx", ["prune 0.5 structure=channel"],
                                    tmp_path / "out")
    assert model.metadata["channel_pruning"]["constant_weights_converted"] == 2
    assert model.metadata["channel_pruning"]["pruned"] == [
        {"layer": "fc1", "next": "fc2", "channels": 32, "kept": 16}]
    assert any("channel pruning 0.5: 1 layer(s) narrowed by L2 norm, 32 -> 16 outputs (2 Constant-node weight(s) "
               "became initializers first)" in note for note in model.notes), model.notes
    shapes = {tensor.name: tuple(tensor.dims) for tensor in onnx.load(str(artifact.path)).graph.initializer}
    assert shapes["w1"] == (16, 16) and shapes["w2"] == (16, 8) and shapes["b1_pruned"] == (16,)
    kept = np.sort(np.argsort(-np.linalg.norm(arrays["w1"], axis=0), kind="stable")[:16])
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    expected = np.maximum(x @ arrays["w1"][:, kept] + arrays["b1"][kept], 0) @ arrays["w2"][kept] + arrays["b2"]
    np.testing.assert_allclose(run(artifact.path, x), expected, rtol=1e-5, atol=1e-5)
