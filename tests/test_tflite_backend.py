"""The tflite backend through its hooks: load, convert, quantize, prune, save and measure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tflite_fixtures import (
    KerasFiles,
    Measured,
    gru_model_file,
    ink_boxes,
    measure_here,
    plain_saved_model,
    shared_digits_files,
    sine_model_file,
    two_head_files,
)

from compressor import (
    Artifact,
    CompressionError,
    Context,
    InvalidInputError,
    MeasureSettings,
    Model,
    Step,
)
from compressor.builtin import gzip_size, read_npz
from compressor.comparing import compare_output
from compressor.plugins import PluginHost
from compressor.recipes import variants_from_strings
from compressor.validation import apply_settings
from compressor_tflite import frameworks, plugin
from compressor_tflite.runtime import open_runtime

QUICK = MeasureSettings(warmup=1, min_iterations=3, min_seconds=0.0, batch_size=64)
QUANTIZE_MODES = ("fp16", "dynamic", "int8", "uint8", "int16x8")


@pytest.fixture(scope="module")
def files() -> KerasFiles:
    return shared_digits_files()


@pytest.fixture(scope="module")
def context(files: KerasFiles) -> Context:
    model = plugin.compressor_load(files.keras, "tflite", Context())
    return Context(
        train_data=read_npz(files.train, model.inputs),
        calibration_data=read_npz(files.calibration, model.inputs),
        eval_data=read_npz(files.eval, model.inputs),
    )


def compress(path: Path, steps: list[Step], context: Context) -> Model:
    model = plugin.compressor_load(path, "tflite", context)
    for step in steps:
        model = plugin.compressor_compress(model, step, context)
    return model


def save_and_measure(model: Model, folder: Path, name: str, data: Path) -> tuple[Path, Measured]:
    artifact = plugin.compressor_save(model, folder / name, Context())
    return artifact.path, measure_here(artifact, read_npz(data, model.inputs), QUICK)


@pytest.fixture(scope="module")
def quantized(
    files: KerasFiles, context: Context, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Measured]]:
    """fp32 and every quantize mode of the tiny CNN, saved and measured once."""
    folder = tmp_path_factory.mktemp("quantized")
    results = {"fp32": save_and_measure(compress(files.keras, [], context), folder, "fp32", files.eval)}
    for mode in QUANTIZE_MODES:
        model = compress(files.keras, [Step("quantize", {"mode": mode})], context)
        results[mode] = save_and_measure(model, folder, mode, files.eval)
    return results


def accuracy(measured: Measured, data: Path) -> float:
    return float((np.asarray(measured.predictions) == np.load(data)["y"]).mean())


def tensor_dtypes(path: Path, which: str = "input") -> list[str]:
    interpreter_class, _ = frameworks.interpreter_class()
    interpreter = interpreter_class(model_path=str(path))
    details = interpreter.get_input_details() if which == "input" else interpreter.get_output_details()
    return [np.dtype(detail["dtype"]).name for detail in details]


def test_backend_declaration() -> None:
    backend = PluginHost().backend("tflite")
    assert backend.extra == "tflite"
    assert backend.requires == ("tensorflow", "tf_keras", "tensorflow_model_optimization")
    assert "ai-edge-litert" in backend.distributions
    assert backend.techniques["quantize"].modes == QUANTIZE_MODES
    assert backend.techniques["quantize"].requires_data == {
        "int8": "calibration", "uint8": "calibration", "int16x8": "calibration"}
    assert backend.runtime_imports == ("ai_edge_litert.interpreter",)
    assert not hasattr(plugin, "compressor_measure")  # core measures the runtime
    assert {"sparsity", "epochs", "batch_size", "begin_step", "frequency"} <= set(
        backend.techniques["prune"].params
    )
    assert {"allow_float_fallback", "calibration_samples"} <= set(
        backend.techniques["quantize"].params
    )


def test_identify(tmp_path: Path) -> None:
    for name in ("m.keras", "m.h5", "m.HDF5", "m.tflite"):
        assert plugin.compressor_identify(tmp_path / name) == "tflite"
    assert plugin.compressor_identify(tmp_path / "m.onnx") is None
    (tmp_path / "saved").mkdir()
    assert plugin.compressor_identify(tmp_path / "saved") is None
    (tmp_path / "saved" / "saved_model.pb").write_bytes(b"")
    assert plugin.compressor_identify(tmp_path / "saved") == "tflite"


def test_quantized_sizes_and_fidelity(quantized: dict[str, tuple[Path, Measured]], files: KerasFiles) -> None:
    sizes = {name: path.stat().st_size for name, (path, _) in quantized.items()}
    assert sizes["fp16"] < 0.6 * sizes["fp32"]
    for mode in ("dynamic", "int8", "uint8", "int16x8"):
        assert sizes[mode] < 0.4 * sizes["fp32"], mode
    reference = quantized["fp32"][1]
    reference_accuracy = accuracy(reference, files.eval)
    assert reference_accuracy > 0.8
    (name,) = reference.outputs
    for mode in QUANTIZE_MODES:
        measured = quantized[mode][1]
        agreement = float(np.mean(np.asarray(measured.predictions) == reference.predictions))
        assert agreement > 0.95, mode
        assert accuracy(measured, files.eval) > reference_accuracy - 0.03, mode
        assert measured.outputs == {name: {"task": "classifier", "reason": "[N, 10]: scores per class, top-1 compared",
                                           "shape": [10]}}, mode
        metrics = measured.metrics
        assert metrics["latency_ms"]["iterations"] >= 3 and metrics["latency_batch_ms"]["iterations"] >= 3
        assert metrics["eval_batch"] == 1 and metrics["batch_size"] == 64 and "fixed_batch" not in metrics
        assert metrics["peak_rss_batch_bytes"] >= metrics["peak_rss_bytes"] > 0
        assert metrics["runtime"] == "ai-edge-litert"
        assert measured.values().shape == (len(measured.predictions), 10)
        # Dequantized outputs are probabilities whatever the tensors' integer type.
        np.testing.assert_allclose(measured.values().sum(axis=1), 1.0, atol=0.05)


def test_integer_modes_have_integer_inputs(quantized: dict[str, tuple[Path, Measured]]) -> None:
    expected = {"fp32": "float32", "fp16": "float32", "dynamic": "float32",
                "int8": "int8", "uint8": "uint8", "int16x8": "int16"}
    for mode, dtype in expected.items():
        path, measured = quantized[mode]
        assert tensor_dtypes(path) == tensor_dtypes(path, "output") == [dtype], mode
        assert measured.metrics["input_dtypes"] == dtype, mode


def test_int16x8_computes_in_int16_with_int8_weights(quantized: dict[str, tuple[Path, Measured]]) -> None:
    """Every op computes on int16 activations, and every weight of a convolution or dense
    layer is int8 (biases int64): TFLite's 16x8 kernels, nothing left in float."""
    path, _ = quantized["int16x8"]
    interpreter = frameworks.analysis_interpreter(path.read_bytes())
    interpreter.allocate_tensors()
    dtypes = {detail["index"]: np.dtype(detail["dtype"]).name for detail in interpreter.get_tensor_details()}
    weighted = 0
    for op in interpreter._get_ops_details():
        operands = [dtypes[index] for index in op["inputs"] if index >= 0]
        results = [dtypes[index] for index in op["outputs"]]
        assert operands[0] == "int16" and results == ["int16"], op["op_name"]
        if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED"):
            assert operands[1:] == ["int8", "int64"], op["op_name"]
            weighted += 1
    assert weighted == 4
    assert "float32" not in dtypes.values()


def test_int16x8_needs_calibration_data(files: KerasFiles) -> None:
    with pytest.raises(CompressionError, match="quantize int16x8 needs --calibration-data"):
        compress(files.keras, [Step("quantize", {"mode": "int16x8"})], Context())


def test_two_heads_both_measured_the_box_as_a_regression(tmp_path: Path) -> None:
    model_path, calibration, data = two_head_files(tmp_path)
    model = plugin.compressor_load(model_path, "tflite", Context())
    context = Context(calibration_data=read_npz(calibration, model.inputs))
    _, fp32 = save_and_measure(model, tmp_path, "fp32", data)
    # LiteRT lists a signature's outputs by name: box, then digit.
    assert fp32.outputs == {
        "box": {"task": "regression", "reason": "named 'box': coordinates", "shape": [4]},
        "digit": {"task": "classifier", "reason": "[N, 10]: scores per class, top-1 compared", "shape": [10]},
    }
    images = np.load(data)["image"]
    digit, box = model.handle.keras_model.predict(images, verbose=0)
    np.testing.assert_allclose(fp32.values("box"), box, atol=1e-4)
    np.testing.assert_allclose(fp32.values("digit"), digit, atol=1e-5)
    assert np.abs(box - ink_boxes(images)).mean() < 0.5  # a real regression, in pixels
    labels = np.load(data)["y"]
    for mode in ("int8", "int16x8"):
        quantized = plugin.compressor_compress(model, Step("quantize", {"mode": mode}), context)
        _, measured = save_and_measure(quantized, tmp_path, mode, data)
        assert {name: entry["task"] for name, entry in measured.outputs.items()} == {
            "box": "regression", "digit": "classifier"}
        boxes = compare_output("regression", fp32.kept["box"], measured.kept["box"], None)
        assert boxes["relative_error"]["mean"] < 0.05 and boxes["cosine"]["min"] > 0.99, mode
        digits = compare_output("classifier", fp32.kept["digit"], measured.kept["digit"], labels)
        assert digits["agreement"] > 0.95 and digits["accuracy"] > 0.85, mode


def test_the_runtime_refuses_data_it_cannot_take(quantized: dict[str, tuple[Path, Measured]]) -> None:
    runtime = open_runtime(quantized["int8"][0], threads=1)
    assert [(spec.name, spec.shape, spec.dtype) for spec in runtime.inputs] == [("image", (None, 8, 8, 1), "float32")]
    assert runtime.fixed_batch is None
    good = runtime.run({"image": np.zeros((3, 8, 8, 1), np.float32)})
    assert [value.shape for value in good.values()] == [(3, 10)]
    with pytest.raises(InvalidInputError, match=r"refused input 'image' \[2, 12, 12, 1\]: .*") as raised:
        runtime.run({"image": np.zeros((2, 12, 12, 1), np.float32)})
    assert "\n" not in str(raised.value)
    # A refusal leaves the runtime usable at the shapes it takes.
    again = runtime.run({"image": np.zeros((3, 8, 8, 1), np.float32)})
    for name, value in good.items():
        np.testing.assert_array_equal(again[name], value)


def test_a_broken_artifact_is_invalid_input(tmp_path: Path) -> None:
    path = tmp_path / "broken.tflite"
    path.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))
    with pytest.raises(InvalidInputError, match="is not a valid TFLite model") as raised:
        plugin.compressor_open_runtime(Artifact("tflite", path, "tflite"), QUICK)
    assert raised.value.path == path


def test_prune_fine_tuned_then_int8_keeps_the_zeros(
    files: KerasFiles, context: Context, quantized: dict[str, tuple[Path, Measured]], tmp_path: Path
) -> None:
    prune = Step("prune", {"sparsity": 0.7, "epochs": 1, "frequency": 5})
    pruned = compress(files.keras, [prune], context)
    assert pruned.metadata["sparsity"] == pytest.approx(0.7, abs=0.02)
    assert "fine-tuning on train.npz" in pruned.notes[0]
    kernels = [w for w in pruned.handle.keras_model.get_weights() if w.ndim > 1]
    assert np.mean(np.concatenate([k.ravel() for k in kernels]) == 0) > 0.6
    sparse_int8 = plugin.compressor_compress(pruned, Step("quantize", {"mode": "int8"}), context)
    path, measured = save_and_measure(sparse_int8, tmp_path, "sparse-int8", files.eval)
    assert sparse_int8.metadata == {"sparsity": pruned.metadata["sparsity"], "quantization": "int8"}
    assert gzip_size(path) < 0.8 * gzip_size(quantized["int8"][0])
    assert accuracy(measured, files.eval) > 0.7


def test_prune_without_training_data_is_one_shot(files: KerasFiles) -> None:
    pruned = compress(files.keras, [Step("prune", {"sparsity": 0.5})], Context())
    assert pruned.metadata["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert "one-shot" in pruned.notes[0] and "no --train-data" in pruned.notes[0]


def test_steps_after_quantize_are_refused(files: KerasFiles, context: Context) -> None:
    model = compress(files.keras, [Step("quantize", {"mode": "fp16"})], context)
    with pytest.raises(CompressionError, match="prune first, quantize last"):
        plugin.compressor_compress(model, Step("prune", {"sparsity": 0.5}), context)


def test_begin_step_past_training_is_a_clear_error(files: KerasFiles, context: Context) -> None:
    with pytest.raises(CompressionError, match="begin_step=100000"):
        compress(files.keras, [Step("prune", {"sparsity": 0.5, "epochs": 1, "begin_step": 100000})], context)


@pytest.mark.parametrize("mode", ["int8", "int16x8"])
def test_float_fallback(tmp_path: Path, mode: str) -> None:
    model_path = sine_model_file(tmp_path)
    model = plugin.compressor_load(model_path, "tflite", Context())
    calibration = Context(calibration_data=read_npz(tmp_path / "sine_calibration.npz", model.inputs))
    with pytest.raises(CompressionError, match=rf"cannot be quantized to {mode}: SIN .*allow_float_fallback"):
        plugin.compressor_compress(model, Step("quantize", {"mode": mode}), calibration)
    step = Step("quantize", {"mode": mode, "allow_float_fallback": True})
    fallback = plugin.compressor_compress(model, step, calibration)
    assert [op.split()[0] for op in fallback.metadata["float_ops"]] == ["SIN"]
    assert "left in float" in fallback.notes[0]


def test_gru_converts_with_a_static_batch_but_refuses_int8(tmp_path: Path) -> None:
    model_path, data_path = gru_model_file(tmp_path)
    model = plugin.compressor_load(model_path, "tflite", Context())
    calibration = Context(calibration_data=read_npz(data_path, model.inputs))
    for mode in ("uint8", "int16x8"):
        with pytest.raises(CompressionError, match="GRU layers crashes TFLite's calibrator"):
            plugin.compressor_compress(model, Step("quantize", {"mode": mode}), calibration)
    dynamic = plugin.compressor_compress(model, Step("quantize", {"mode": "dynamic"}), Context())
    _, measured = save_and_measure(dynamic, tmp_path, "gru-dynamic", data_path)
    assert measured.metrics["fixed_batch"] == 1 and "latency_batch_ms" not in measured.metrics
    # Converted from a concrete function: the signature names its one output output_0.
    assert list(measured.outputs) == ["output_0"]
    # Every example must start from a fresh recurrent state, whatever ran before it.
    x = np.load(data_path)["x"]
    expected = model.handle.keras_model.predict(x, verbose=0)
    np.testing.assert_allclose(measured.values(), expected, atol=0.02)


def test_h5_and_saved_model_load_like_keras(files: KerasFiles, quantized: dict[str, tuple[Path, Measured]], tmp_path: Path) -> None:
    for path, fmt in ((files.h5, "h5"), (files.saved_model, "saved_model")):
        model = plugin.compressor_load(path, "tflite", Context())
        assert model.format == fmt
        assert [spec.shape for spec in model.inputs] == [(None, 8, 8, 1)]
        _, measured = save_and_measure(model, tmp_path, fmt, files.eval)
        assert np.array_equal(measured.predictions, quantized["fp32"][1].predictions)


def test_plain_saved_model_converts_but_cannot_be_pruned(tmp_path: Path) -> None:
    path, weights = plain_saved_model(tmp_path)
    model = plugin.compressor_load(path, "tflite", Context())
    assert [(spec.name, spec.shape) for spec in model.inputs] == [("features", (None, 8))]
    with pytest.raises(CompressionError, match="can only be quantized"):
        plugin.compressor_compress(model, Step("prune", {"sparsity": 0.5}), Context())
    dynamic = plugin.compressor_compress(model, Step("quantize", {"mode": "dynamic"}), Context())
    x = np.random.default_rng(0).normal(size=(20, 8)).astype("float32")
    np.savez(tmp_path / "data.npz", features=x, y=np.zeros(20, dtype=np.int64))
    _, measured = save_and_measure(dynamic, tmp_path, "plain", tmp_path / "data.npz")
    np.testing.assert_allclose(measured.values(), x @ weights, atol=0.05)


def test_tflite_input_is_measured_as_is(quantized: dict[str, tuple[Path, Measured]], files: KerasFiles, tmp_path: Path) -> None:
    model = plugin.compressor_load(quantized["uint8"][0], "tflite", Context())
    assert model.format == "tflite"
    assert [(spec.shape, spec.dtype) for spec in model.inputs] == [((None, 8, 8, 1), "float32")]
    _, measured = save_and_measure(model, tmp_path, "copy", files.eval)
    assert np.array_equal(measured.predictions, quantized["uint8"][1].predictions)
    with pytest.raises(CompressionError, match="start from the Keras model"):
        plugin.compressor_compress(model, Step("quantize", {"mode": "fp16"}), Context())


def test_sample_model_and_its_variants_are_valid(tmp_path: Path) -> None:
    (sample,) = plugin.compressor_sample_models(tmp_path)
    backend = PluginHost().backend("tflite")
    variants, _ = apply_settings(backend, variants_from_strings(sample.variants), {})
    assert [[str(step) for step in variant.steps] for variant in variants] == [
        ["quantize fp16"], ["quantize dynamic"], ["quantize int8"], ["prune 0.5 epochs=1", "quantize int8"],
    ]
    model = plugin.compressor_load(sample.path, "tflite", Context())
    _, measured = save_and_measure(model, tmp_path, "sample", sample.eval_data)
    assert accuracy(measured, sample.eval_data) > 0.9
    for data in (sample.train_data, sample.calibration_data):
        assert read_npz(data, model.inputs).size >= 200


def test_without_litert_tf_lite_runs_it(quantized: dict[str, tuple[Path, Measured]]) -> None:
    """With ai-edge-litert missing, the measuring process imports TensorFlow before it times
    the load, and ``tf.lite.Interpreter`` runs the model: the same outputs."""
    path, measured = quantized["int8"]
    code = (
        "import sys, json, numpy as np\n"
        "sys.modules['ai_edge_litert'] = None  # as if not installed\n"
        "from compressor_tflite import plugin\n"
        "from compressor_tflite.runtime import open_runtime\n"
        "(backend,) = plugin.compressor_backends()\n"
        f"runtime = open_runtime({str(path)!r}, threads=1)\n"
        f"images = np.load({str(shared_digits_files().eval)!r})['x'][:20]\n"
        "(scores,) = runtime.run({'image': images}).values()\n"
        "print(json.dumps([backend.runtime_imports, runtime.metrics(), scores.argmax(1).tolist()]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    imports, metrics, top1 = json.loads(result.stdout.strip().splitlines()[-1])
    assert imports == ["tensorflow"]
    assert metrics == {"runtime": "tf.lite", "input_dtypes": "int8"}
    assert top1 == measured.predictions[:20].tolist()
