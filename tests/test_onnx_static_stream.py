"""Static int8 of large ONNX models, streamed one weight at a time (int8_static_stream.py):
the graph, weights and outputs ONNX Runtime's ``quantize_static`` gives on the same model
and calibration data, and the large path taking it through the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from conftest import snapshot
from onnx import TensorProto, helper, numpy_helper

from compressor import Context, Step
from compressor.builtin import read_npz
from compressor.cli import cli
from compressor_frontends.pytorch.export import LARGE_MODEL_VARIABLE
from compressor_onnx.int8_file import quantize_static_file
from compressor_onnx.int8_static_stream import quantize_static_stream
from compressor_onnx.int8_static_transformer import quantize_transformer_stream
from compressor_onnx.shapes import graph_input_specs
from compressor_onnx.transformer_static import quantize_transformer_file

ROWS = 24


def write_model(folder: Path, opset: int = 17) -> tuple[Path, Path]:
    """Every op the path quantizes: an embedding Gather, MatMul, Gemm (transB, bias, beta 0.5),
    Conv with bias, a tensor read by two quantized nodes, two graph outputs written by them."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    initializers = [weight("embedding", 20, 8), weight("w0", 8, 16), weight("w1", 12, 16), weight("b1", 12),
                    weight("w2", 5, 3, 3), weight("b2", 5), weight("w3", 20, 6), weight("w4", 16, 6)]
    # A Constant (kept inside the .onnx): shape inference needs the values to type what follows.
    shape = numpy_helper.from_array(np.array([-1, 3, 4], np.int64), "conv_shape")
    nodes = [
        helper.make_node("Constant", [], ["conv_shape"], name="shape", value=shape),
        helper.make_node("Gather", ["embedding", "ids"], ["embedded"], name="embed"),
        helper.make_node("ReduceMean", ["embedded"], ["pooled"], name="pool", axes=[1], keepdims=0),
        helper.make_node("Add", ["x", "pooled"], ["a"], name="add"),
        helper.make_node("MatMul", ["a", "w0"], ["m0"], name="matmul0"),
        helper.make_node("Relu", ["m0"], ["h0"], name="relu0"),
        helper.make_node("Gemm", ["h0", "w1", "b1"], ["g1"], name="gemm1", transB=1, beta=0.5),
        helper.make_node("Relu", ["g1"], ["h1"], name="relu1"),
        helper.make_node("Reshape", ["h1", "conv_shape"], ["c_in"], name="reshape"),
        helper.make_node("Conv", ["c_in", "w2", "b2"], ["c_out"], name="conv", pads=[1, 1]),
        helper.make_node("Flatten", ["c_out"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "w3"], ["logits"], name="matmul3"),
        helper.make_node("MatMul", ["h0", "w4"], ["aux"], name="matmul4"),
    ]
    graph = helper.make_graph(
        nodes, "static", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
                          helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 6]),
         helper.make_tensor_value_info("aux", TensorProto.FLOAT, ["batch", 6])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    data = folder / "calibration.npz"
    np.savez(data, x=rng.standard_normal((ROWS, 8)).astype(np.float32),
             ids=rng.integers(0, 20, (ROWS, 4)).astype(np.int64))
    return path, data


def write_attention(folder: Path) -> tuple[Path, Path]:
    """A transformer-like block: projections, activation x activation MatMuls (both inputs
    quantized), Softmax, LayerNormalization, a residual Add and an output projection."""
    rng = np.random.default_rng(1)
    width = 8
    initializers = [numpy_helper.from_array((rng.standard_normal((width, width)) * 0.4).astype(np.float32), name)
                    for name in ("wq", "wk", "wv", "wo")]
    initializers += [numpy_helper.from_array(np.ones(width, np.float32), "gamma"),
                     numpy_helper.from_array(np.zeros(width, np.float32), "beta")]
    nodes = [helper.make_node("MatMul", ["x", f"w{name}"], [name], name=f"proj_{name}") for name in "qkv"]
    nodes += [
        helper.make_node("Transpose", ["k"], ["kt"], name="transpose", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
        helper.make_node("Softmax", ["scores"], ["attention"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["attention", "v"], ["context"], name="context"),
        helper.make_node("Add", ["x", "context"], ["residual"], name="residual"),
        helper.make_node("LayerNormalization", ["residual", "gamma", "beta"], ["normed"], name="norm", axis=-1),
        helper.make_node("MatMul", ["normed", "wo"], ["y"], name="proj_o"),
    ]
    graph = helper.make_graph(nodes, "attention",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5, width])],
                              initializers)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "attention.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
                    save_as_external_data=True, location="attention.onnx.data", size_threshold=0)
    data = folder / "calibration.npz"
    np.savez(data, x=rng.standard_normal((ROWS, 5, width)).astype(np.float32))
    return path, data


def context_for(path: Path, data: Path, workdir: Path) -> Context:
    specs = tuple(graph_input_specs(onnx.load(str(path), load_external_data=False).graph))
    workdir.mkdir(parents=True, exist_ok=True)
    return Context(calibration_data=read_npz(data, specs), workdir=workdir)


def nodes(path: Path) -> list[str]:
    """Each node as text (name, op, inputs, outputs, attributes), in a fixed order."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return sorted(str(node) for node in graph.node)


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in onnx.load(str(path)).graph.initializer}


def run(path: Path, data: Path) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    arrays = np.load(data)
    return session.run(None, {spec.name: arrays[spec.name] for spec in session.get_inputs()})


def in_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on calibration runs the model one weight at a time (segments.py)."""
    from compressor_onnx import segments

    monkeypatch.setenv(LARGE_MODEL_VARIABLE, "1000")
    monkeypatch.setattr(segments, "MIN_PIECE_BYTES", 0)
    monkeypatch.setattr(segments, "PIECES", 1000)


@pytest.mark.parametrize("graph, mode, params, excluded, pieces", [
    (write_model, "int8", {}, [], False),
    (write_model, "int8", {}, [], True),
    (write_model, "uint8", {"per_channel": False, "reduce_range": "true"}, ["matmul4"], False),
    (write_model, "int8", {"calibration_method": "percentile", "exclude_op_types": "Gather,Conv"}, [], False),
    (write_model, "int8", {"calibration_method": "percentile"}, [], True),
    (write_model, "uint8", {"calibration_method": "entropy"}, [], False),
    (write_attention, "int8", {}, [], False),
    (write_attention, "int8", {}, [], True),
])
def test_streamed_static_int8_is_what_quantize_static_writes(tmp_path: Path, graph: Any, mode: str, params: dict,
                                                               excluded: list[str], pieces: bool,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The same bytes, the model calibrated whole or piece by piece."""
    path, data = graph(tmp_path / "model")
    before = snapshot(path.parent)
    step = Step("quantize", {"mode": mode, "calibration_samples": 128, **params})
    reduce_range = params.get("reduce_range") == "true"
    reference, streamed = tmp_path / "reference" / "q.onnx", tmp_path / "streamed" / "q.onnx"
    for target in (reference, streamed):
        target.parent.mkdir()
    quantize_static_file(path, reference, step, excluded, context_for(path, data, tmp_path / "work-a"), reduce_range)
    if pieces:
        in_pieces(monkeypatch)
    notes, metadata = quantize_static_stream(path, streamed, step, excluded, context_for(path, data, tmp_path / "work-b"),
                                             reduce_range)
    assert snapshot(path.parent) == before
    assert nodes(streamed) == nodes(reference)
    expected, got = initializers(reference), initializers(streamed)
    assert got.keys() == expected.keys()
    for name, array in expected.items():
        assert got[name].dtype == array.dtype, name
        np.testing.assert_array_equal(got[name], array, err_msg=name)
    for mine, theirs in zip(run(streamed, data), run(reference, data)):
        np.testing.assert_array_equal(mine, theirs)
    ops = [node.op_type for node in onnx.load(str(streamed), load_external_data=False).graph.node]
    assert ops.count("QuantizeLinear") >= 4 and "float" not in str(notes).lower()
    assert metadata["static_path"] == "streamed QDQ" and metadata["calibration_peak_rss_bytes"] > 0
    assert not list((tmp_path / "work-b").rglob("*.onnx*"))  # the calibration's links and probe are gone


def test_old_opsets_get_per_tensor_weights_with_a_note(tmp_path: Path) -> None:
    path, data = write_model(tmp_path / "model", opset=12)
    step = Step("quantize", {"mode": "int8"})
    reference, streamed = tmp_path / "reference" / "q.onnx", tmp_path / "streamed" / "q.onnx"
    for target in (reference, streamed):
        target.parent.mkdir()
    expected_notes = quantize_static_file(path, reference, step, [], context_for(path, data, tmp_path / "a"), False)
    notes, metadata = quantize_static_stream(path, streamed, step, [], context_for(path, data, tmp_path / "b"), False)
    assert metadata["per_channel"] is False and notes[0] == expected_notes[0]
    weights = initializers(streamed)
    assert weights["w0_scale"].shape == () and weights["w0_quantized"].dtype == np.int8
    assert nodes(streamed) == nodes(reference)
    for mine, theirs in zip(run(streamed, data), run(reference, data)):
        np.testing.assert_array_equal(mine, theirs)


@pytest.mark.parametrize("pieces", [False, True])
def test_streamed_transformer_static_is_the_transformer_paths_model(tmp_path: Path, pieces: bool,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """SmoothQuant's weights produced, not written; its Mul's output calibrated from the graph as it
    is (whole, or one weight at a time)."""
    path, data = write_attention(tmp_path / "model")
    step = Step("quantize", {"mode": "int8", "alpha": 0.8})
    reference, streamed = tmp_path / "reference" / "q.onnx", tmp_path / "streamed" / "q.onnx"
    for target in (reference, streamed):
        target.parent.mkdir()
    quantize_transformer_file(path, reference, step, [], context_for(path, data, tmp_path / "a"), False)
    if pieces:
        in_pieces(monkeypatch)
    notes, metadata = quantize_transformer_stream(path, streamed, step, [], context_for(path, data, tmp_path / "b"),
                                                  False)
    assert nodes(streamed) == nodes(reference)
    expected, got = initializers(reference), initializers(streamed)
    assert got.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_allclose(got[name], array, rtol=1e-6, atol=0, err_msg=name)
    for mine, theirs in zip(run(streamed, data), run(reference, data)):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    assert metadata["quantized_matmuls"] == 3 and "quant_pre_process is skipped" in notes[0]


def test_the_large_path_streams_static_int8_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            private_tmpdir: Path) -> None:
    from onnx_fixtures import write_external_mlp

    model, data = write_external_mlp(tmp_path / "mlp")
    monkeypatch.setenv(LARGE_MODEL_VARIABLE, "2000")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(model), "-q", "int8", "--data", str(data), "--calibration-data",
                                      str(data), "-o", str(out), "--min-seconds", "0"])
    assert result.exit_code == 0, result.output
    variant = json.loads((out / "report.json").read_text())["variants"][1]
    assert variant["error"] is None and variant["metadata"]["static_path"] == "streamed QDQ"
    assert variant["metrics"]["cosine"]["mean"] > 0.99
    assert (out / "int8.onnx.data").stat().st_size > 0
    assert not list(private_tmpdir.iterdir())
