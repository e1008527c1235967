"""The onnx backend end to end: load, export, quantize, prune, save and measure,
through the hooks, the CLI and a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx_fixtures import (
    FACTORY,
    DigitsFiles,
    EncoderFiles,
    make_digits_files,
    make_tiny_bert,
    measure_here,
)

from compressor import Context, InvalidInputError, MeasureSettings, Step, UsageError
from compressor.builtin import read_npz
from compressor.cli import cli
from compressor_frontends.pytorch import export as torch_export
from compressor_frontends.pytorch.shapes import SampleShape, parse_input_shape
from compressor_onnx import plugin
from compressor_onnx.pruning import sparsity_of

QUICK = MeasureSettings(warmup=1, min_iterations=3, min_seconds=0.0, batch_size=16)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsFiles:
    return make_digits_files(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> EncoderFiles:
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")


def options(**values: object) -> dict[str, object]:
    defaults = {key: param.default for key, param in plugin.backend().options.items()}
    return {**defaults, **values}


def context_for(digits: DigitsFiles, **values: object) -> Context:
    model = plugin.compressor_load(digits.state_dict, "onnx", Context(options=options(model_factory=FACTORY)))
    return Context(
        options=options(model_factory=FACTORY, **values),
        eval_data=read_npz(digits.eval, model.inputs),
        calibration_data=read_npz(digits.calibration, model.inputs),
    )


def compress_save_measure(path: Path, steps: list[Step], context: Context, out: Path,
                          data_path: Path) -> tuple[onnx.ModelProto, dict, object]:
    model = plugin.compressor_load(path, "onnx", context)
    for step in steps:
        model = plugin.compressor_compress(model, step, context)
    out.mkdir(parents=True, exist_ok=True)
    artifact = plugin.compressor_save(model, out / "model", context)
    measured = measure_here(artifact, read_npz(data_path, model.inputs), QUICK)
    return onnx.load(str(artifact.path)), {**model.metadata, **artifact.metadata}, measured


def accuracy(measured: object, data_path: Path) -> float:
    labels = np.load(data_path)["y"]
    return float((np.asarray(measured.predictions) == labels).mean())


def test_identify(tmp_path: Path, encoder: EncoderFiles) -> None:
    for name in ("m.onnx", "m.pt2", "m.pt", "m.PTH", "m.safetensors"):
        assert plugin.compressor_identify(tmp_path / name) == "onnx"
    assert plugin.compressor_identify(tmp_path / "m.keras") is None
    assert plugin.compressor_identify(encoder.folder) == "onnx"
    assert plugin.compressor_identify(tmp_path) is None


def test_parse_input_shape() -> None:
    assert parse_input_shape("1,64") == (SampleShape("x", (1, 64), "float32"),)
    assert parse_input_shape("input_ids:2,128:int64;attention_mask:2,128:int64")[1] == SampleShape(
        "attention_mask", (2, 128), "int64"
    )
    assert parse_input_shape("ids:1,8:int64")[0].spec.shape == (None, None)
    for bad in ("", "1,x", "a:1,2;3,4", "x:1,2:complex", "x:0,3"):
        with pytest.raises(UsageError):
            parse_input_shape(bad)


def test_state_dict_original_matches_torch(digits: DigitsFiles, tmp_path: Path) -> None:
    graph, metadata, measured = compress_save_measure(
        digits.state_dict, [], context_for(digits), tmp_path, digits.eval
    )
    assert metadata["opset"] == 17
    assert len(metadata["float_nodes"]) == 2
    assert accuracy(measured, digits.eval) == pytest.approx(digits.accuracy)
    assert measured.outputs["output"]["task"] == "classifier"
    assert measured.metrics["latency_batch_ms"]["throughput_per_s"] > 0
    assert measured.metrics["eval_batch"] == 1
    batch_axis = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_param and not batch_axis.HasField("dim_value")


@pytest.mark.parametrize("per_channel", [True, False])
def test_dynamic_quantization(digits: DigitsFiles, tmp_path: Path, per_channel: bool) -> None:
    step = Step("quantize", {"mode": "dynamic", "per_channel": per_channel})
    graph, metadata, measured = compress_save_measure(
        digits.state_dict, [step], context_for(digits), tmp_path, digits.eval
    )
    ops = {node.op_type for node in graph.graph.node}
    assert "DynamicQuantizeLinear" in ops and ("MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops)
    assert metadata["float_nodes"] == []
    assert (digits.accuracy - accuracy(measured, digits.eval)) * 100 <= 1.5


@pytest.mark.parametrize("mode,method", [("int8", "minmax"), ("uint8", "entropy")])
def test_static_quantization(digits: DigitsFiles, tmp_path: Path, mode: str, method: str) -> None:
    step = Step("quantize", {"mode": mode, "calibration_method": method, "calibration_samples": 64})
    graph, metadata, measured = compress_save_measure(
        digits.state_dict, [step], context_for(digits), tmp_path, digits.eval
    )
    quantize_nodes = [node for node in graph.graph.node if node.op_type == "QuantizeLinear"]
    assert quantize_nodes
    zero_points = {t.name: t for t in graph.graph.initializer}
    activation_type = zero_points[quantize_nodes[0].input[2]].data_type
    assert activation_type == (onnx.TensorProto.UINT8 if mode == "uint8" else onnx.TensorProto.INT8)
    assert metadata["float_nodes"] == []
    assert (digits.accuracy - accuracy(measured, digits.eval)) * 100 <= 1.5


def test_fp16_keeps_float32_inputs_and_outputs(digits: DigitsFiles, tmp_path: Path) -> None:
    graph, _, measured = compress_save_measure(
        digits.state_dict, [Step("quantize", {"mode": "fp16"})], context_for(digits), tmp_path, digits.eval
    )
    weights = [t for t in graph.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert accuracy(measured, digits.eval) >= digits.accuracy - 0.01


def test_exclusions_stay_float(digits: DigitsFiles, tmp_path: Path) -> None:
    context = context_for(digits)
    probe = plugin.compressor_save(
        plugin.compressor_load(digits.state_dict, "onnx", context), tmp_path / "probe", context
    )
    first_gemm = next(node.name for node in onnx.load(str(probe.path)).graph.node if node.op_type == "Gemm")
    step = Step("quantize", {"mode": "int8", "exclude_nodes": first_gemm})
    _, metadata, _ = compress_save_measure(digits.state_dict, [step], context, tmp_path / "a", digits.eval)
    assert metadata["float_nodes"] == [first_gemm]
    step = Step("quantize", {"mode": "dynamic", "exclude_op_types": "MatMul"})
    _, metadata, _ = compress_save_measure(digits.state_dict, [step], context, tmp_path / "b", digits.eval)
    assert len(metadata["float_nodes"]) == 2
    with pytest.raises(UsageError, match="no_such_node"):
        compress_save_measure(digits.state_dict, [Step("quantize", {"mode": "dynamic", "exclude_nodes": "no_such_node"})],
                              context, tmp_path / "c", digits.eval)


def test_prune_then_quantize_holds_real_zeros(digits: DigitsFiles, tmp_path: Path) -> None:
    context = context_for(digits)
    dense, _, _ = compress_save_measure(digits.state_dict, [], context, tmp_path / "dense", digits.eval)
    pruned, metadata, measured = compress_save_measure(
        digits.state_dict, [Step("prune", {"sparsity": 0.6})], context, tmp_path / "pruned", digits.eval
    )
    assert sparsity_of(pruned) == pytest.approx(0.6, abs=0.01)
    assert sparsity_of(dense) < 0.01
    assert len(pruned.graph.node) == len(dense.graph.node)
    assert len(pruned.graph.initializer) == len(dense.graph.initializer)
    assert metadata["pruned_layers"] == 2
    assert accuracy(measured, digits.eval) > 0.8
    both, _, _ = compress_save_measure(
        digits.state_dict, [Step("prune", {"sparsity": 0.6}), Step("quantize", {"mode": "dynamic"})],
        context, tmp_path / "both", digits.eval,
    )
    assert "DynamicQuantizeLinear" in {node.op_type for node in both.graph.node}


def test_onnx_input_prune_and_quantize(digits: DigitsFiles, tmp_path: Path) -> None:
    context = Context(options=options(), calibration_data=read_npz(digits.calibration, ()))
    pruned, _, measured = compress_save_measure(
        digits.onnx, [Step("prune", {"sparsity": 0.5}), Step("quantize", {"mode": "int8"})],
        context, tmp_path, digits.eval,
    )
    assert "QuantizeLinear" in {node.op_type for node in pruned.graph.node}
    assert accuracy(measured, digits.eval) > 0.85


def test_torch_export_program_goes_through_dynamo_and_quantizes(digits: DigitsFiles, tmp_path: Path) -> None:
    import torch

    program = torch.export.export(
        digits.module, (torch.zeros(2, 64),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    path = tmp_path / "digits.pt2"
    torch.export.save(program, path)
    context = Context(options=options())
    model = plugin.compressor_load(path, "onnx", context)
    assert [spec.name for spec in model.inputs] == ["input"]  # Sequential.forward(input)
    graph, _, measured = compress_save_measure(
        path, [Step("quantize", {"mode": "dynamic"})], context, tmp_path / "out", digits.eval
    )
    assert graph.opset_import[0].version >= 18
    assert accuracy(measured, digits.eval) >= digits.accuracy - 0.015


def test_transformers_folder_exports_multi_input_with_dynamic_axes(
    encoder: EncoderFiles, tmp_path: Path
) -> None:
    import onnxruntime as ort

    context = Context(options=options())
    model = plugin.compressor_load(encoder.folder, "onnx", context)
    assert [spec.name for spec in model.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    context.eval_data = read_npz(encoder.eval, model.inputs)
    model = plugin.compressor_compress(model, Step("quantize", {"mode": "dynamic"}), context)
    artifact = plugin.compressor_save(model, tmp_path / "bert", context)
    # Without shape annotations ONNX Runtime keeps Add + LayerNormalization (faster than SkipLayerNorm)
    assert not onnx.load(str(artifact.path)).graph.value_info
    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    for batch, length in ((1, 5), (3, 11)):
        feeds = {i.name: np.ones((batch, length), dtype=np.int64) for i in session.get_inputs()}
        assert session.run(None, feeds)[0].shape == (batch, length, encoder.hidden_size)
    measured = measure_here(artifact, context.eval_data, QUICK)
    from compressor.comparing import nearest_neighbours

    assert measured.outputs["last_hidden_state"]["task"] == "embedding"
    vectors = measured.kept["last_hidden_state"]["vectors"]
    assert vectors.shape == (24, encoder.hidden_size)
    assert all(index != row for row, index in enumerate(nearest_neighbours(vectors)))


def test_transformers_attention_exports_without_sdpa_mask_handling(
    encoder: EncoderFiles, tmp_path: Path
) -> None:
    """Eager attention: the SDPA export's IsNaN/Where mask guard slowed every quantized graph."""
    import onnx

    context = Context(options=options())
    model = plugin.compressor_load(encoder.folder, "onnx", context)
    artifact = plugin.compressor_save(model, tmp_path / "fp32", context)
    op_types = {node.op_type for node in onnx.load(str(artifact.path)).graph.node}
    assert "Softmax" in op_types and "IsNaN" not in op_types


@pytest.mark.parametrize("fixed_batch", [1, 4])
def test_fixed_batch_graph_is_timed_and_evaluated_at_its_batch(fixed_batch: int, tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    from compressor import Artifact, Dataset

    weights = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])], "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [fixed_batch, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [fixed_batch, 3])],
        [numpy_helper.from_array(weights, "w")],
    )
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    features = np.random.default_rng(1).normal(size=(10, 8)).astype(np.float32)
    data = Dataset(path=tmp_path / "eval.npz", features={"x": features}, labels=None, size=10)
    measured = measure_here(Artifact("onnx", path, "onnx"), data, QUICK)
    assert measured.metrics["fixed_batch"] == fixed_batch and "latency_batch_ms" not in measured.metrics
    assert list(measured.predictions) == list(np.argmax(features @ weights, axis=1))


def test_mean_pooling_ignores_padding() -> None:
    from compressor.tasks import mean_pool

    hidden = np.array([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]], dtype=np.float32)
    assert mean_pool(hidden, np.array([[1, 1, 0]])).tolist() == [[2.0, 2.0]]


def test_large_graph_is_saved_with_external_data(
    digits: DigitsFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch_export, "LARGE_MODEL_BYTES", 1000)
    context = Context(options=options())
    model = plugin.compressor_load(digits.onnx, "onnx", context)
    artifact = plugin.compressor_save(model, tmp_path / "big", context)
    assert [path.name for path in artifact.side_files] == ["big.onnx.data"]
    assert artifact.path.stat().st_size < 1000
    measured = measure_here(artifact, read_npz(digits.eval, model.inputs), QUICK)
    assert accuracy(measured, digits.eval) == pytest.approx(digits.accuracy)


def test_state_dict_needs_a_fitting_factory(digits: DigitsFiles) -> None:
    with pytest.raises(UsageError, match="model_factory"):
        plugin.compressor_load(digits.state_dict, "onnx", Context(options=options()))
    with pytest.raises(UsageError, match="cannot import"):
        plugin.compressor_load(digits.state_dict, "onnx", Context(options=options(model_factory="nope.mod:f")))
    with pytest.raises(InvalidInputError, match="do not fit"):
        plugin.compressor_load(
            digits.state_dict, "onnx", Context(options=options(model_factory="torch.nn:Identity"))
        )


def test_export_without_examples_asks_for_input_shape(digits: DigitsFiles, tmp_path: Path) -> None:
    model = plugin.compressor_load(digits.state_dict, "onnx", Context(options=options(model_factory=FACTORY)))
    with pytest.raises(UsageError, match="input_shape"):
        plugin.compressor_save(model, tmp_path / "m", Context(options=options(model_factory=FACTORY)))
    declared = Context(options=options(model_factory=FACTORY, input_shape="1,64"))
    model = plugin.compressor_load(digits.state_dict, "onnx", declared)
    assert model.inputs[0].shape == (None, 64)
    assert plugin.compressor_save(model, tmp_path / "m", declared).path.exists()


def test_sample_model(tmp_path: Path) -> None:
    (sample,) = plugin.compressor_sample_models(tmp_path)
    assert sample.path.exists() and sample.eval_data.exists() and sample.calibration_data.exists()
    assert ("quantize int8",) in sample.variants and sample.options["model_factory"] == FACTORY


def test_cli_run_state_dict(digits: DigitsFiles, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [
        "run", str(digits.state_dict), "-o", str(out), "-q", "dynamic", "-q", "int8",
        "--set", f"model_factory={FACTORY}", "--set", "calibration_method=percentile",
        "--data", str(digits.eval), "--calibration-data", str(digits.calibration),
        "--min-seconds", "0", "--max-accuracy-drop", "1.5",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    variants = {variant["name"]: variant for variant in report["variants"]}
    assert variants["original"]["metrics"]["accuracy"] == pytest.approx(digits.accuracy)
    assert variants["int8"]["metrics"]["agreement"] > 0.97
    assert variants["dynamic"]["metadata"]["opset"] == 17
    assert variants["dynamic"]["metrics"]["size_bytes"] < variants["original"]["metrics"]["size_bytes"] / 2


def test_cli_int8_without_calibration_data_is_refused(digits: DigitsFiles, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["run", str(digits.onnx), "-o", str(tmp_path / "out"), "-q", "int8"])
    assert result.exit_code == 2
    assert "--calibration-data" in result.output
    assert not (tmp_path / "out").exists()


def test_subprocess_run_onnx_file(digits: DigitsFiles, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "compressor", "run", str(digits.onnx), "-o", str(out), "-q", "fp16",
         "--data", str(digits.eval), "--min-seconds", "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    fp16 = report["variants"][1]
    assert fp16["metrics"]["agreement"] > 0.98
    assert (out / fp16["artifact"]).suffix == ".onnx"
