"""The tflite backend through its hooks: load, convert, quantize, prune, save and measure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tflite_fixtures import (
    KerasFiles,
    gru_model_file,
    plain_saved_model,
    shared_digits_files,
    sine_model_file,
)

from compressor import CompressionError, Context, MeasureSettings, Model, Step
from compressor.builtin import gzip_size, read_npz
from compressor.plugins import PluginHost
from compressor.recipes import variants_from_strings
from compressor.validation import apply_settings
from compressor_tflite import frameworks, plugin

QUICK = MeasureSettings(warmup=1, min_iterations=3, min_seconds=0.0, batch_size=64)
QUANTIZE_MODES = ("fp16", "dynamic", "int8", "uint8")


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


def save_and_measure(model: Model, folder: Path, name: str, data: Path) -> tuple[Path, Any]:
    artifact = plugin.compressor_save(model, folder / name, Context())
    measured = plugin.compressor_measure(artifact, read_npz(data, model.inputs), QUICK)
    return artifact.path, measured


@pytest.fixture(scope="module")
def quantized(
    files: KerasFiles, context: Context, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Any]]:
    """fp32 and every quantize mode of the tiny CNN, saved and measured once."""
    folder = tmp_path_factory.mktemp("quantized")
    results = {"fp32": save_and_measure(compress(files.keras, [], context), folder, "fp32", files.eval)}
    for mode in QUANTIZE_MODES:
        model = compress(files.keras, [Step("quantize", {"mode": mode})], context)
        results[mode] = save_and_measure(model, folder, mode, files.eval)
    return results


def accuracy(measured: Any, data: Path) -> float:
    return float((np.asarray(measured.predictions) == np.load(data)["y"]).mean())


def input_dtypes(path: Path) -> list[str]:
    interpreter_class, _ = frameworks.interpreter_class()
    interpreter = interpreter_class(model_path=str(path))
    return [np.dtype(detail["dtype"]).name for detail in interpreter.get_input_details()]


def test_backend_declaration() -> None:
    backend = PluginHost().backend("tflite")
    assert backend.extra == "tflite"
    assert backend.requires == ("tensorflow", "tf_keras", "tensorflow_model_optimization")
    assert "ai-edge-litert" in backend.distributions
    assert backend.techniques["quantize"].modes == QUANTIZE_MODES
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


def test_quantized_sizes_and_fidelity(quantized: dict[str, tuple[Path, Any]], files: KerasFiles) -> None:
    sizes = {name: path.stat().st_size for name, (path, _) in quantized.items()}
    assert sizes["fp16"] < 0.6 * sizes["fp32"]
    for mode in ("dynamic", "int8", "uint8"):
        assert sizes[mode] < 0.4 * sizes["fp32"], mode
    reference_accuracy = accuracy(quantized["fp32"][1], files.eval)
    assert reference_accuracy > 0.8
    for mode in QUANTIZE_MODES:
        measured = quantized[mode][1]
        agreement = float(np.mean(np.asarray(measured.predictions) == quantized["fp32"][1].predictions))
        assert agreement > 0.95, mode
        assert accuracy(measured, files.eval) > reference_accuracy - 0.03, mode
        assert measured.metrics["latency_ms"]["iterations"] >= 3
        assert measured.metrics["load_ms"] > 0
        assert measured.metrics["runtime"] == "ai-edge-litert"
        assert measured.outputs.shape == (len(measured.predictions), 10)


def test_integer_modes_have_integer_inputs(quantized: dict[str, tuple[Path, Any]]) -> None:
    assert input_dtypes(quantized["fp32"][0]) == ["float32"]
    assert input_dtypes(quantized["int8"][0]) == ["int8"]
    assert input_dtypes(quantized["uint8"][0]) == ["uint8"]
    assert quantized["uint8"][1].metrics["input_dtypes"] == "uint8"


def test_prune_fine_tuned_then_int8_keeps_the_zeros(
    files: KerasFiles, context: Context, quantized: dict[str, tuple[Path, Any]], tmp_path: Path
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


def test_float_fallback(tmp_path: Path) -> None:
    model_path = sine_model_file(tmp_path)
    model = plugin.compressor_load(model_path, "tflite", Context())
    calibration = Context(calibration_data=read_npz(tmp_path / "sine_calibration.npz", model.inputs))
    with pytest.raises(CompressionError, match=r"cannot be quantized to int8: SIN .*allow_float_fallback"):
        plugin.compressor_compress(model, Step("quantize", {"mode": "int8"}), calibration)
    step = Step("quantize", {"mode": "int8", "allow_float_fallback": True})
    fallback = plugin.compressor_compress(model, step, calibration)
    assert [op.split()[0] for op in fallback.metadata["float_ops"]] == ["SIN"]
    assert "left in float" in fallback.notes[0]


def test_gru_converts_with_a_static_batch_but_refuses_int8(tmp_path: Path) -> None:
    model_path, data_path = gru_model_file(tmp_path)
    model = plugin.compressor_load(model_path, "tflite", Context())
    calibration = Context(calibration_data=read_npz(data_path, model.inputs))
    with pytest.raises(CompressionError, match="GRU layers crashes TFLite's calibrator"):
        plugin.compressor_compress(model, Step("quantize", {"mode": "uint8"}), calibration)
    dynamic = plugin.compressor_compress(model, Step("quantize", {"mode": "dynamic"}), Context())
    _, measured = save_and_measure(dynamic, tmp_path, "gru-dynamic", data_path)
    # Every example must start from a fresh recurrent state, whatever ran before it.
    x = np.load(data_path)["x"]
    expected = model.handle.keras_model.predict(x, verbose=0)
    np.testing.assert_allclose(measured.outputs, expected, atol=0.02)


def test_h5_and_saved_model_load_like_keras(files: KerasFiles, quantized: dict[str, tuple[Path, Any]], tmp_path: Path) -> None:
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
    np.testing.assert_allclose(measured.outputs, x @ weights, atol=0.05)


def test_tflite_input_is_measured_as_is(quantized: dict[str, tuple[Path, Any]], files: KerasFiles, tmp_path: Path) -> None:
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
