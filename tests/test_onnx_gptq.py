"""int4 GPTQ (gptq.py, gptq_solver.py) on a small MLP built here: lower layer reconstruction
error than RTN on the calibration data, MatMulNBits tensors ONNX Runtime runs as the numpy
model computes them, the same bytes on the large-model path and in several passes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_fixtures import make_tiny_bert

from compressor import Context, Step
from compressor.builtin import read_npz
from compressor.validation import validate_step
from compressor_frontends.pytorch.export import LARGE_MODEL_VARIABLE
from compressor_onnx import plugin

#: fc0's 80 rows make three 32-blocks, the last one partial: odd count and padding both covered.
WIDTHS = (80, 128, 64, 10)
ROWS = 128  # the default calibration_samples: every row calibrates


def module(weights: dict[str, Any], x: Any) -> dict[str, Any]:
    """The MLP in numpy: each layer's input and the logits."""
    r0 = np.maximum(x @ weights["w0"], 0)
    r1 = np.maximum(r0 @ weights["w1"].T + weights["b1"], 0)
    return {"fc0": x, "fc1": r0, "fc2": r1, "logits": r1 @ weights["w2"]}


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """MatMul, Gemm (transB) and MatMul, with correlated, unevenly scaled calibration inputs."""
    folder = tmp_path_factory.mktemp("gptq-mlp")
    rng = np.random.default_rng(0)
    inner, hidden, narrow, classes = WIDTHS
    weights = {
        "w0": (rng.standard_normal((inner, hidden)) / 9).astype(np.float32),
        "w1": (rng.standard_normal((narrow, hidden)) / 11).astype(np.float32),  # Gemm transB: [out, in]
        "b1": (rng.standard_normal(narrow) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((narrow, classes)) / 8).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"], name="fc0"),
        helper.make_node("Relu", ["h0"], ["r0"], name="relu0"),
        helper.make_node("Gemm", ["r0", "w1", "b1"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["logits"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", inner])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    path = folder / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    mixing = rng.standard_normal((inner, inner)) / np.sqrt(inner)
    scales = np.linspace(0.2, 4, inner)
    for name, seed in (("calibration", 1), ("other", 2)):
        x = np.random.default_rng(seed).standard_normal((ROWS, inner)) @ mixing * scales + 0.3
        np.savez(folder / f"{name}.npz", x=(x if name == "calibration" else np.abs(x[::-1]) * 3).astype(np.float32))
    return path, weights


def quantize(path: Path, out: Path, calibration: Path | None = None, **params: object) -> tuple[Path, Any]:
    """``quantize int4`` through the plugin's load, compress and save hooks: the artifact and Model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    options = {key: param.default for key, param in plugin.backend().options.items()}
    context = Context(options=options, workdir=out.parent)
    model = plugin.compressor_load(path, "onnx", context)
    if calibration is not None:
        context.calibration_data = read_npz(calibration, model.inputs)
    step = validate_step(plugin.backend(), Step("quantize", {"mode": "int4", **params}))
    model = plugin.compressor_compress(model, step, context)
    return plugin.compressor_save(model, out, context).path, model


def dequantized(path: Path) -> dict[str, Any]:
    """Each MatMulNBits node's weight ``[K, N]`` decoded from its packed tensors, by node name."""
    graph = onnx.load(str(path)).graph
    tensors = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    weights = {}
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        rows, block = attributes["K"], attributes["block_size"]
        packed, scales = tensors[node.input[1]], tensors[node.input[2]]
        codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(packed.shape[0], -1).astype(np.float32)
        if len(node.input) > 3:
            zero_points = tensors[node.input[3]]
            zeros = np.stack([zero_points & 15, zero_points >> 4], axis=-1).reshape(len(zero_points), -1)
            zeros = zeros[:, :scales.shape[1]].astype(np.float32)
        else:
            zeros = np.full(scales.shape, 8, dtype=np.float32)
        values = (codes - np.repeat(zeros, block, axis=1)) * np.repeat(scales, block, axis=1)
        weights[node.name.removesuffix("_Q4")] = values[:, :rows].T
    return weights


def run(path: Path, x: Any) -> Any:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def relative_error(estimate: Any, reference: Any) -> float:
    return float(np.linalg.norm(estimate - reference) / np.linalg.norm(reference))


def test_gptq_reconstructs_every_layer_better_than_rtn_and_runs_as_computed(
        mlp: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    path, weights = mlp
    calibration = path.parent / "calibration.npz"
    gptq, model = quantize(path, tmp_path / "gptq" / "m", calibration, algorithm="gptq", accuracy_level=0)
    rtn, _ = quantize(path, tmp_path / "rtn" / "m", accuracy_level=0)
    float_weights = {"fc0": weights["w0"], "fc1": weights["w1"].T, "fc2": weights["w2"]}
    x = np.load(calibration)["x"]
    inputs = module(weights, x)
    ours, theirs = dequantized(gptq), dequantized(rtn)
    assert sorted(ours) == sorted(theirs) == ["fc0", "fc1_MatMul", "fc2"]
    for layer, weight in float_weights.items():
        name = layer + "_MatMul" if layer == "fc1" else layer
        exact = inputs[layer] @ weight
        gptq_error = relative_error(inputs[layer] @ ours[name], exact)
        rtn_error = relative_error(inputs[layer] @ theirs[name], exact)
        assert gptq_error < 0.9 * rtn_error, (layer, gptq_error, rtn_error)
    assert any("gptq: 3 MatMul weight(s)" in note and f"{ROWS} activation rows" in note for note in model.notes)
    # ONNX Runtime's MatMulNBits computes what the decoded weights say (fp32 compute, accuracy_level 0).
    quantized_weights = {"w0": ours["fc0"], "w1": ours["fc1_MatMul"].T, "b1": weights["b1"], "w2": ours["fc2"]}
    np.testing.assert_allclose(run(gptq, x), module(quantized_weights, x)["logits"], rtol=1e-4, atol=1e-4)
    assert relative_error(run(gptq, x), module(weights, x)["logits"]) < relative_error(
        run(rtn, x), module(weights, x)["logits"])


def test_gptq_depends_on_the_calibration_data(mlp: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    path, _ = mlp
    first, _ = quantize(path, tmp_path / "a" / "m", path.parent / "calibration.npz", algorithm="gptq")
    second, _ = quantize(path, tmp_path / "b" / "m", path.parent / "other.npz", algorithm="gptq")
    ours, theirs = dequantized(first), dequantized(second)
    assert all(not np.array_equal(ours[name], theirs[name]) for name in ours)
    graph = onnx.load(str(first)).graph
    nbits = [node for node in graph.node if node.op_type == "MatMulNBits"]
    assert len(nbits) == 3 and all(len(node.input) == 4 for node in nbits)  # asymmetric: zero points
    assert {helper.get_attribute_value(a) for node in nbits for a in node.attribute if a.name == "accuracy_level"} == {4}


def test_symmetric_gptq_has_no_zero_points_and_excluded_nodes_stay_float(
        mlp: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    path, weights = mlp
    calibration = path.parent / "calibration.npz"
    artifact, _ = quantize(path, tmp_path / "sym" / "m", calibration, algorithm="gptq", symmetric=True,
                           exclude_nodes="fc2")
    graph = onnx.load(str(artifact)).graph
    kinds = {node.name: node.op_type for node in graph.node}
    assert kinds["fc2"] == "MatMul" and kinds["fc0_Q4"] == kinds["fc1_MatMul_Q4"] == "MatMulNBits"
    assert all(len(node.input) == 3 for node in graph.node if node.op_type == "MatMulNBits")
    x = np.load(calibration)["x"]
    assert relative_error(run(artifact, x), module(weights, x)["logits"]) < 0.1


def test_gptq_gives_the_same_bytes_on_the_large_path_and_in_several_passes(
        mlp: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In memory, in one pass or three; on disk, the model run in pieces of one weight each."""
    from compressor_onnx import gptq, segments

    path, _ = mlp
    calibration = path.parent / "calibration.npz"
    small, _ = quantize(path, tmp_path / "small" / "m", calibration, algorithm="gptq")
    monkeypatch.setattr(gptq, "HESSIAN_BYTES", 8 * 128 * 128)  # one layer input per pass
    split, split_model = quantize(path, tmp_path / "split" / "m", calibration, algorithm="gptq")
    monkeypatch.setenv(LARGE_MODEL_VARIABLE, "2000")
    monkeypatch.setattr(segments, "MIN_PIECE_BYTES", 0)
    monkeypatch.setattr(segments, "PIECES", 1000)  # each piece past its budget with its first weight
    large, large_model = quantize(path, tmp_path / "large" / "m", calibration, algorithm="gptq")
    assert large_model.handle.path is not None
    assert any("3 passes" in note for note in split_model.notes)
    pieces = [int(found.group(1)) for note in large_model.notes
              if (found := re.search(r"one pass over them, the model in (\d+) pieces", note))]
    assert pieces and pieces[0] >= 3, large_model.notes
    expected = dequantized(small)
    for other in (split, large):
        assert {name: value.tobytes() for name, value in dequantized(other).items()} == {
            name: value.tobytes() for name, value in expected.items()}


def test_gptq_on_a_tiny_bert_calibrates_every_linear_layer_in_one_pass(tmp_path: Path) -> None:
    encoder = make_tiny_bert(tmp_path / "bert")
    options = {key: param.default for key, param in plugin.backend().options.items()}
    context = Context(options=options, workdir=tmp_path)
    original = plugin.compressor_save(plugin.compressor_load(encoder.folder, "onnx", context), tmp_path / "fp32",
                                      context).path
    gptq, model = quantize(original, tmp_path / "gptq" / "m", encoder.eval, algorithm="gptq", block_size="16")
    rtn, _ = quantize(original, tmp_path / "rtn" / "m", block_size="16")

    def nbits(path: Path) -> list[str]:
        return sorted(node.name for node in onnx.load(str(path)).graph.node if node.op_type == "MatMulNBits")

    assert nbits(gptq) == nbits(rtn) and len(nbits(gptq)) >= 2 * 6  # Q, K, V, output, up, down per layer
    rows = int(np.load(encoder.eval)["input_ids"].size)
    assert any(f"gptq: {len(nbits(gptq))} MatMul weight(s) calibrated on {rows} activation rows" in note
               and "1 pass over them" in note for note in model.notes)
    feeds = dict(np.load(encoder.eval))

    def hidden(path: Path) -> Any:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {item.name: feeds[item.name] for item in session.get_inputs()})[0]

    assert relative_error(hidden(gptq), hidden(original)) < 0.1


def test_solver_is_rounding_to_nearest_without_correlation_and_beats_onnx_runtimes_gptq() -> None:
    from onnxruntime.quantization.neural_compressor.weight_only import gptq as onnx_runtime_gptq

    from compressor_onnx.gptq_solver import Hessian, factor, gptq, matmul_nbits_tensors

    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((128, 64)) / 11).astype(np.float32)
    identity = gptq(weights, factor(np.eye(128)), 32, symmetric=False)
    groups = weights.reshape(4, 32, 64)
    low, high = np.minimum(groups.min(1), 0), np.maximum(groups.max(1), 0)
    scale = ((high - low) / 15).astype(np.float32)
    zero = np.rint(-low / scale)
    nearest = np.clip(np.rint(groups / scale[:, None]) + zero[:, None], 0, 15)
    np.testing.assert_array_equal(identity.codes, nearest.reshape(128, 64))
    x = rng.standard_normal((400, 128)).astype(np.float32) @ rng.standard_normal((128, 128)).astype(np.float32)
    x *= np.linspace(0.1, 5, 128).astype(np.float32)
    hessian = Hessian(128)
    hessian.add(x[:150])
    hessian.add(x[150:])
    exact = 2 * x.T.astype(np.float64) @ x / len(x)
    np.testing.assert_allclose(hessian.matrix(), exact, atol=1e-5 * np.abs(exact).max())
    ours = gptq(weights, factor(hessian.matrix()), 32, symmetric=False)
    theirs = onnx_runtime_gptq(weights.copy(), hessian.matrix())  # ONNX Runtime 1.32 propagates no error
    assert relative_error(x @ ours.dequantized(), x @ weights) < 0.9 * relative_error(x @ theirs, x @ weights)
    assert relative_error(x @ ours.dequantized(), x @ weights) < 0.9 * relative_error(
        x @ identity.dequantized(), x @ weights)
    tensors = matmul_nbits_tensors(ours)
    assert tensors["B"].shape == (64, 4, 16) and tensors["scales"].shape == (64, 4)
    assert tensors["zero_points"].shape == (64, 2)


def test_gptq_on_activations_that_overflow_is_a_compression_error(
        mlp: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    from compressor import CompressionError

    path, _ = mlp
    overflowing = tmp_path / "overflowing.npz"
    np.savez(overflowing, x=np.full((8, WIDTHS[0]), 3e38, dtype=np.float32))  # its X^T X is infinite
    with pytest.raises(CompressionError, match=r"int4 gptq failed on w0 \(the layer input is NaN or infinite"):
        quantize(path, tmp_path / "bad" / "m", overflowing, algorithm="gptq")
    assert not list((tmp_path / "bad").glob("m*"))
