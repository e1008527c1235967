"""The onnx backend's int4, transformer static int8, Constant-node weights and
reduce_range, on small real models built here (onnx, ONNX Runtime, torch)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from onnx_fixtures import EncoderFiles, make_tiny_bert

from compressor import Context, Step
from compressor.builtin import read_npz
from compressor.cli import cli
from compressor.validation import validate_step
from compressor_frontends.pytorch.export import LARGE_MODEL_VARIABLE
from compressor_onnx import plugin
from compressor_onnx.quantize_common import resolve_reduce_range

ROWS = 64


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> EncoderFiles:
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An MLP with MatMul and Gemm (transB) layers and a 2-D embedding-free input, plus data."""
    folder = tmp_path_factory.mktemp("mlp")
    rng = np.random.default_rng(0)
    w0 = (rng.standard_normal((96, 128)) / 10).astype(np.float32)
    w1 = (rng.standard_normal((64, 128)) / 11).astype(np.float32)  # Gemm transB: [out, in]
    w2 = (rng.standard_normal((64, 10)) / 8).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"], name="fc0"),
        helper.make_node("Relu", ["h0"], ["r0"], name="relu0"),
        helper.make_node("Gemm", ["r0", "w1", "b1"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["logits"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 96])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1"),
         numpy_helper.from_array(rng.standard_normal(64).astype(np.float32) * 0.1, "b1"),
         numpy_helper.from_array(w2, "w2")],
    )
    path = folder / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    data = folder / "data.npz"
    np.savez(data, x=rng.standard_normal((ROWS, 96)).astype(np.float32))
    calibration = folder / "calibration.npz"
    np.savez(calibration, x=(rng.standard_normal((ROWS, 96)) * 2 + 0.5).astype(np.float32))
    return path, data


def options(**values: object) -> dict[str, object]:
    return {**{key: param.default for key, param in plugin.backend().options.items()}, **values}


def step(mode: str, **params: object) -> Step:
    return validate_step(plugin.backend(), Step("quantize", {"mode": mode, **params}))


def quantize(path: Path, quantize_step: Step, out: Path, calibration: Path | None = None,
             context_options: dict[str, object] | None = None) -> tuple[Path, Any]:
    """Load, quantize and save through the plugin's hooks: the artifact and the Model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    context = Context(options=options(**(context_options or {})), workdir=out.parent)
    model = plugin.compressor_load(path, "onnx", context)
    if calibration is not None:
        context.calibration_data = read_npz(calibration, model.inputs)
    model = plugin.compressor_compress(model, quantize_step, context)
    artifact = plugin.compressor_save(model, out, context)
    model.metadata.update(artifact.metadata)  # as core joins saving's facts to the model's
    return artifact.path, model


def run(path: Path, feeds: dict[str, Any]) -> list[Any]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def op_types(path: Path) -> Counter[str]:
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def initializer_bytes(path: Path) -> dict[str, bytes]:
    model = onnx.load(str(path))
    return {tensor.name: numpy_helper.to_array(tensor).tobytes() for tensor in model.graph.initializer}


def test_int4_writes_matmulnbits_smaller_with_bounded_error(mlp: tuple[Path, Path], tmp_path: Path) -> None:
    path, data = mlp
    x = np.load(data)["x"]
    reference = run(path, {"x": x})[0]
    artifact, model = quantize(path, step("int4"), tmp_path / "int4" / "model")
    ops = op_types(artifact)
    assert ops["MatMulNBits"] == 3 and ops["MatMul"] == 0 and ops["Gemm"] == 0
    assert size(artifact) < size(path) / 4
    output = run(artifact, {"x": x})[0]
    # Random Gaussian weights in 16 levels per block of 32, through three layers.
    assert np.linalg.norm(output - reference) / np.linalg.norm(reference) < 0.2
    assert (output.argmax(1) == reference.argmax(1)).mean() > 0.85
    assert model.metadata["int4"] == {"block_size": 32, "symmetric": False, "algorithm": "rtn", "accuracy_level": 4}
    assert model.metadata["float_nodes"] == []


@pytest.mark.parametrize("algorithm", ["rtn", "hqq"])
def test_int4_large_path_writes_the_small_paths_bytes(
    mlp: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algorithm: str
) -> None:
    path, data = mlp
    small, _ = quantize(path, step("int4", algorithm=algorithm, block_size="16"), tmp_path / "small" / "m")
    monkeypatch.setenv(LARGE_MODEL_VARIABLE, "2000")
    large, model = quantize(path, step("int4", algorithm=algorithm, block_size="16"), tmp_path / "large" / "m")
    assert model.handle.path is not None and large.with_name(large.name + ".data").exists()
    assert op_types(small) == op_types(large)
    small_bytes, large_bytes = initializer_bytes(small), initializer_bytes(large)
    assert set(small_bytes) == set(large_bytes)
    assert all(small_bytes[name] == large_bytes[name] for name in small_bytes)
    x = np.load(data)["x"]
    np.testing.assert_array_equal(run(small, {"x": x})[0], run(large, {"x": x})[0])


def test_int4_quantizes_embeddings_with_gather_block_quantized(encoder: EncoderFiles, tmp_path: Path) -> None:
    artifact, model = quantize(encoder.folder, step("int4", block_size="16"), tmp_path / "bert" / "m")
    graph = onnx.load(str(artifact))
    assert Counter(node.op_type for node in graph.graph.node)["GatherBlockQuantized"] == 3
    assert next(entry.version for entry in graph.opset_import if entry.domain in ("", "ai.onnx")) == 17
    floats = {t.name for t in graph.graph.initializer if t.data_type == TensorProto.FLOAT}
    assert not {name for name in floats if name.endswith("embeddings.weight")}  # all three are 4-bit now
    feeds = {name: array for name, array in np.load(encoder.eval).items()}
    kept, _ = quantize(encoder.folder, step("int4", block_size="16", exclude_op_types="Gather"),
                       tmp_path / "kept" / "m")
    assert op_types(kept)["GatherBlockQuantized"] == 0 and size(kept) > size(artifact)
    assert run(artifact, feeds)[0].shape == run(kept, feeds)[0].shape


@pytest.mark.parametrize("symmetric", [True, False])
def test_an_all_zero_embedding_row_quantizes_to_zeros_without_a_warning(symmetric: bool) -> None:
    """A padding row of zeros has scale 0 in every block: ONNX Runtime's block functions divide
    by it, and numpy's warning must not reach the terminal; the row reads back as zeros."""
    import warnings

    from compressor_onnx.int4_rewrites import block_quantize_rows

    table = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    table[2] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        packed, scales, *zeros = block_quantize_rows(table, 32, symmetric)
    values = np.stack([packed & 15, packed >> 4], axis=-1).reshape(4, 64).astype(np.float32)
    if symmetric:
        offsets = np.full((4, 2), 8.0, dtype=np.float32)
    else:
        offsets = np.stack([zeros[0] & 15, zeros[0] >> 4], axis=-1).reshape(4, -1)[:, :2].astype(np.float32)
    restored = (values - np.repeat(offsets, 32, axis=1)) * np.repeat(scales, 32, axis=1)
    assert not restored[2].any() and not scales[2].any()
    assert np.abs(restored - table).max() < 0.5 * np.abs(table).max() / 7


def test_transformer_static_keeps_attention_norms_and_output_float(encoder: EncoderFiles, tmp_path: Path) -> None:
    artifact, model = quantize(encoder.folder, step("int8"), tmp_path / "static" / "m", encoder.eval)
    graph = onnx.load(str(artifact)).graph
    producers = {output: node for node in graph.node for output in node.output}

    def from_dequantize(name: str) -> bool:
        return name in producers and producers[name].op_type == "DequantizeLinear"

    matmuls = [node for node in graph.node if node.op_type == "MatMul"]
    quantized = [node for node in matmuls if from_dequantize(node.input[1])]
    attention = [node for node in matmuls if not from_dequantize(node.input[1])]
    assert len(quantized) == 2 * 6 and len(attention) == 2 * 2  # Q, K, V, out, up, down; scores, context
    assert all(not from_dequantize(name) for node in attention for name in node.input)
    for node in graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "Erf", "Gemm", "Tanh"):
            assert not any(from_dequantize(name) for name in node.input), node.name
    quantize_outputs = {producers[node.input[0]].op_type for node in graph.node
                        if node.op_type == "QuantizeLinear" and node.input[0] in producers}
    assert "MatMul" not in quantize_outputs  # MatMul outputs stay float (MatMulIntegerToFloat)
    metadata = model.metadata
    assert metadata["model_type"] == "transformer" and metadata["static_path"] == "transformer"
    assert metadata["activation_type"] in ("uint8", "int8") and metadata["quantized_matmuls"] == 12
    reasons = metadata["float_node_reasons"]
    assert len(reasons["activation x activation MatMul (attention)"]) == 4
    assert reasons["output projection"] == ["/module/pooler/dense/Gemm"]
    assert metadata["float_nodes"] == ["/module/pooler/dense/Gemm"]
    assert metadata["quantized_embeddings"] == 3
    feeds = {name: array for name, array in np.load(encoder.eval).items()}
    reference, _ = quantize(encoder.folder, step("fp16"), tmp_path / "fp16" / "m")
    ours = run(artifact, feeds)[0]
    theirs = run(reference, feeds)[0]
    cosine = (ours * theirs).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(theirs, axis=-1)
    assert cosine.mean() > 0.98


def test_generic_static_path_on_request(encoder: EncoderFiles, tmp_path: Path) -> None:
    _, model = quantize(encoder.folder, step("int8", model_type="generic"), tmp_path / "g" / "m", encoder.eval)
    assert model.metadata["model_type"] == "generic" and "static_path" not in model.metadata


def constant_weight_model(path: Path) -> None:
    """MatMul and Conv whose weights are Constant nodes, as Paddle and TF exports write them."""
    rng = np.random.default_rng(1)
    conv = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    dense = rng.standard_normal((16 * 8 * 8, 64)).astype(np.float32) / 30
    nodes = [
        helper.make_node("Constant", [], ["conv2d_157.w_0"], value=numpy_helper.from_array(conv)),
        helper.make_node("Conv", ["x", "conv2d_157.w_0"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([-1, 1024]))),
        helper.make_node("Reshape", ["r", "shape"], ["flat"], name="flatten"),
        helper.make_node("Constant", [], ["fc.w_0"], value=numpy_helper.from_array(dense)),
        helper.make_node("MatMul", ["flat", "fc.w_0"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "constants", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize("large", [False, True])
@pytest.mark.parametrize("mode", ["dynamic", "int8", "int4"])
def test_constant_node_weights_are_quantized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str,
                                             large: bool) -> None:
    path = tmp_path / "constants.onnx"
    constant_weight_model(path)
    x = np.random.default_rng(2).standard_normal((ROWS, 3, 8, 8)).astype(np.float32)
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, x=x)
    if large:
        monkeypatch.setenv(LARGE_MODEL_VARIABLE, "2000")
    artifact, model = quantize(path, step(mode), tmp_path / "out" / "m", calibration)
    assert model.metadata["constant_weights_converted"] == 2
    assert any("Constant-node weight(s) became initializers" in note for note in model.notes)
    assert not any("did not shrink" in note for note in model.notes)
    assert model.metadata["weight_bytes_after"] < model.metadata["weight_bytes_before"] / 2
    graph = onnx.load(str(artifact))
    assert "fc.w_0" not in {t.name for t in graph.graph.initializer}  # the dense weight is quantized
    reference = run(path, {"x": x})[0]
    output = run(artifact, {"x": x})[0]
    assert np.linalg.norm(output - reference) / np.linalg.norm(reference) < 0.15


def test_weights_that_did_not_shrink_get_a_note(tmp_path: Path) -> None:
    path = tmp_path / "conv.onnx"
    constant_weight_model(path)
    _, model = quantize(path, step("int4", exclude_op_types="MatMul"), tmp_path / "out" / "m")
    assert any("did not shrink" in note for note in model.notes)


def test_reduce_range_is_recorded_and_matches_onnx_runtime(
    mlp: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from compressor.environment import cpu_info

    path, data = mlp
    _, auto = quantize(path, step("dynamic"), tmp_path / "auto" / "m")
    vnni = {"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_info()["flags"])
    assert auto.metadata["reduce_range"] is resolve_reduce_range(step("dynamic"))
    import platform

    if platform.machine() == "x86_64":
        assert auto.metadata["reduce_range"] is (not vnni)
    small, model = quantize(path, step("dynamic", reduce_range="true"), tmp_path / "small" / "m")
    assert model.metadata["reduce_range"] is True
    weights = numpy_helper.to_array(next(t for t in onnx.load(str(small)).graph.initializer
                                         if t.name == "w0_quantized"))
    assert np.abs(weights.astype(int)).max() <= 64  # 7-bit weights
    monkeypatch.setenv(LARGE_MODEL_VARIABLE, "2000")
    large, _ = quantize(path, step("dynamic", reduce_range="true"), tmp_path / "large" / "m")
    small_bytes, large_bytes = initializer_bytes(small), initializer_bytes(large)
    assert all(large_bytes[name] == small_bytes[name] for name in small_bytes if name in large_bytes)
    assert small_bytes["w0_quantized"] == large_bytes["w0_quantized"]
    _, static = quantize(path, step("int8", reduce_range="false"), tmp_path / "static" / "m",
                         path.parent / "calibration.npz")
    assert static.metadata["reduce_range"] is False and static.metadata["model_type"] == "generic"


@pytest.mark.parametrize("arguments,message", [
    (["-q", "int4", "--set", "block_size=48"], "block_size='48' is not one of: 16, 32, 64, 128, 256"),
    (["-q", "int4", "--set", "algorithm=gptq"], "needs --calibration-data"),
    (["-q", "int4", "--set", "algorithm=awq"], "algorithm=awq needs --calibration-data"),
    (["-q", "int4", "--set", "algorithm=squeezellm"], "algorithm='squeezellm' is not one of"),
    (["-q", "int8", "--set", "alpha=1.5"], "alpha"),
])
def test_bad_parameters_fail_before_work(mlp: tuple[Path, Path], tmp_path: Path, arguments: list[str],
                                         message: str) -> None:
    out = tmp_path / "out"
    extra = ["--calibration-data", str(mlp[0].parent / "calibration.npz")] if "int8" in arguments[1] else []
    result = CliRunner().invoke(cli, ["run", str(mlp[0]), "-o", str(out), *arguments, *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not out.exists()


def test_cli_int4_and_static_report(mlp: tuple[Path, Path], tmp_path: Path) -> None:
    path, data = mlp
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[variants.rtn]\nsteps = ["quantize int4"]\n\n'
                      '[variants.hqq]\nsteps = ["quantize int4 algorithm=hqq block_size=16"]\n')
    result = CliRunner().invoke(cli, [
        "run", str(path), "-o", str(out), "--recipe", str(recipe), "--data", str(data), "--min-seconds", "0",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    variants = {variant["name"]: variant for variant in report["variants"]}
    assert len(variants) == 3
    for name, variant in variants.items():
        if name != "original":
            assert variant["metrics"]["size_bytes"] < variants["original"]["metrics"]["size_bytes"] / 3
            assert variant["metrics"]["cosine"]["mean"] > 0.99
