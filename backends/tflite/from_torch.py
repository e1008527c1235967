"""PyTorch models in the tflite backend (``--backend tflite``): loaded by the PyTorch
front end, converted by Google's litert-torch, quantized by ai-edge-quantizer.

The torch model is read by :mod:`compressor_frontends.pytorch.loading` (state_dict plus
``--set model_factory``, ``.safetensors``, ``.pt2``, transformers folders; with
its safety checks), converted once to a float LiteRT flatbuffer on first use
(shared by every fork), and quantized with ai-edge-quantizer's recipes:
``fp16`` (float16 weights), ``dynamic`` (int8 weights, int8 compute),
``int8`` (int8 weights and activations, calibrated) and ``int16x8``. The
converter lowers ``Linear`` with a dynamic batch to shapes it cannot build, so
the flatbuffer has a static batch of 1; core then measures it one example at a time.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from compressor.plugin import (
    CompressionError,
    Context,
    Model,
    Step,
    TensorSpec,
    UnsupportedError,
    UsageError,
    first_line,
)
from compressor_frontends.pytorch import TorchModel
from compressor_tflite import frameworks
from compressor_tflite.handle import TFLiteHandle

FORMAT = "torch"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".pt2", ".safetensors")
#: compressor's quantize modes and the ai-edge-quantizer recipe each maps onto.
RECIPES = {"fp16": "float_casting fp16 weights", "dynamic": "dynamic_wi8_afp32",
           "int8": "static_wi8_ai8", "int16x8": "static_wi8_ai16"}
_REFUSED = {
    "uint8": "ai-edge-quantizer quantizes to int8, not uint8; use quantize int8",
}
_SIGNATURE = "serving_default"
_INSTALL_HINT = "pip install 'compressor[cross]' (litert-torch)"


def reads(path: Path) -> bool:
    """Whether ``path`` is a PyTorch model this module converts (only with ``--backend tflite``)."""
    from compressor_frontends.pytorch.loading import is_transformers_folder

    if path.is_dir():
        return is_transformers_folder(path)
    return path.suffix.lower() in TORCH_SUFFIXES


@dataclass
class _Conversion:
    """The float flatbuffer of one loaded torch model, shared by every fork."""

    flatbuffer: bytes | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class TorchSource(TFLiteHandle):
    """A torch model still to be converted to LiteRT."""

    network: TorchModel | None = None
    conversion: _Conversion = field(default_factory=_Conversion)


def is_torch_source(handle: Any) -> bool:
    return isinstance(handle, TorchSource)


def load(path: Path, options: dict[str, Any], trust: bool) -> tuple[TorchSource, str, tuple[TensorSpec, ...]]:
    """Read the torch model with the PyTorch front end's loaders (and their safety checks)."""
    if find_spec("litert_torch") is None or find_spec("ai_edge_quantizer") is None:
        raise UnsupportedError(f"reading PyTorch models on backend 'tflite' needs litert-torch: {_INSTALL_HINT}")
    from compressor_frontends.pytorch.loading import load_torch_model

    model, inputs = load_torch_model(path, options, trust)
    return TorchSource(network=model), FORMAT, inputs


def fork(model: Model) -> Model:
    """A fork shares the loaded torch model and its conversion; steps never modify either."""
    handle: TorchSource = model.handle
    shared = TorchSource(network=handle.network, conversion=handle.conversion)
    return Model(model.backend, model.source, model.format, shared, model.inputs, list(model.notes),
                 dict(model.metadata))


def check_step(step: Step) -> None:
    """Refuse what a PyTorch source cannot do on this backend, before any conversion."""
    if step.technique != "quantize":
        raise UsageError(
            f"'{step}' is not available for a PyTorch model on backend 'tflite' (only quantize "
            f"{', '.join(RECIPES)}); use --backend onnx or torch, or prune before saving the model"
        )
    if step.mode in _REFUSED:
        raise UsageError(f"quantize {step.mode} of a PyTorch model on backend 'tflite': {_REFUSED[step.mode]}")
    if step.mode not in RECIPES:
        raise UsageError(f"quantize {step.mode} is not available for a PyTorch model on backend 'tflite'; "
                         f"it supports: {', '.join(RECIPES)}")


def float_flatbuffer(handle: TorchSource, context: Context) -> bytes:
    """The float LiteRT flatbuffer, converted on first use."""
    conversion = handle.conversion
    if conversion.flatbuffer is None:
        with _quiet():
            import litert_torch  # noqa: F401 - imported before timing: a cold import takes seconds
        # JAX (imported by litert-torch) warns at every fork, also at subprocess's fork+exec.
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        started = time.perf_counter()
        assert handle.network is not None
        conversion.flatbuffer = _convert(handle.network, context)
        conversion.metadata = {"converter": _converter_version(),
                               "convert_seconds": round(time.perf_counter() - started, 3)}
    return conversion.flatbuffer


def quantize(model: Model, step: Step, params: dict[str, Any], context: Context) -> Model:
    """Convert (once) and quantize with the ai-edge-quantizer recipe for ``step.mode``."""
    from compressor_tflite.convert import float_ops

    check_step(step)
    handle: TorchSource = model.handle
    if step.mode in ("int8", "int16x8") and context.calibration_data is None:
        raise UsageError(f"quantize {step.mode} needs --calibration-data")
    source = float_flatbuffer(handle, context)
    quantized = _quantize(source, str(step.mode), params, context)
    notes = list(model.notes)
    metadata = {**model.metadata, **handle.conversion.metadata, "quantization": step.mode,
                "recipe": RECIPES[str(step.mode)]}
    if step.mode in ("int8", "int16x8"):
        left = float_ops(quantized)
        if left and not params.get("allow_float_fallback"):
            raise CompressionError(
                f"ops that cannot be quantized to {step.mode}: {'; '.join(left)}; "
                "--set allow_float_fallback=true keeps them in float"
            )
        if left:
            metadata["float_ops"] = left
            notes.append(f"left in float (allow_float_fallback): {'; '.join(left)}")
    return Model(model.backend, model.source, "tflite", TFLiteHandle(flatbuffer=quantized), model.inputs,
                 notes, metadata)


def _converter_version() -> str:
    from importlib.metadata import version

    return f"litert-torch {version('litert-torch')}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """litert-torch and ai-edge-quantizer print progress bars and reports; keep the CLI's output clean."""
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    with (warnings.catch_warnings(), frameworks.native_stderr_silenced(),
          contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())):
        warnings.simplefilter("ignore")
        yield


def _convert(network: TorchModel, context: Context) -> bytes:
    import torch

    from compressor_frontends.pytorch.export import example_inputs

    with _quiet():
        import litert_torch
    names, module = network.input_names, network.eager()
    arrays = example_inputs(network, context)
    present = [name for name in names if name in arrays]
    sample = {name: torch.from_numpy(np.ascontiguousarray(arrays[name][:1])) for name in present}
    wrapper = _wrap(module, tuple(present), network.keyword_inputs)
    try:
        with _quiet(), torch.no_grad():
            converted = litert_torch.convert(wrapper, sample_kwargs=sample)
            content = converted.model_content
            return bytes(content() if callable(content) else content)
    except Exception as error:  # noqa: BLE001 - the converter raises anything the model's code can
        raise CompressionError(
            f"litert-torch cannot convert this model ({type(error).__name__}: {_summary(error)}); "
            "use --backend onnx or torch"
        ) from None


def _wrap(module: Any, names: tuple[str, ...], by_keyword: bool) -> Any:
    """A module taking the inputs by name (they name the LiteRT signature's inputs) and
    returning every output tensor by the names the onnx backend gives them
    (:func:`compressor_frontends.pytorch.outputs.flatten_outputs`)."""
    import torch

    from compressor_frontends.pytorch.outputs import flatten_outputs

    class Forward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = module
            # Not .eval(): a .pt2 program's module refuses train(); the loaded module is in eval mode.
            self.training = False

        def forward(self, **inputs: Any) -> Any:
            result = self.module(**inputs) if by_keyword else self.module(*(inputs[name] for name in names))
            return dict(flatten_outputs(result))

    return Forward()


def _summary(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = lines[0] if lines else first_line(error)
    return line if len(line) <= 200 else line[:197] + "..."


def _quantize(flatbuffer: bytes, mode: str, params: dict[str, Any], context: Context) -> bytes:
    from ai_edge_quantizer import quantizer, recipe

    try:
        with _quiet():
            if mode == "fp16":
                engine = quantizer.Quantizer(flatbuffer)
                _fp16_weights(engine)
            else:
                chosen = {"dynamic": recipe.dynamic_wi8_afp32, "int8": recipe.static_wi8_ai8,
                          "int16x8": recipe.static_wi8_ai16}[mode]()
                engine = quantizer.Quantizer(flatbuffer, chosen)
            calibration = None
            if engine.need_calibration:
                context.progress("calibrating", None)
                feeds = list(_calibration_feeds(flatbuffer, context, int(params.get("calibration_samples") or 200)))
                calibration = _calibrate(engine, flatbuffer, feeds)
            result = engine.quantize(calibration, enable_progress_report=False)
    except (ValueError, RuntimeError, KeyError) as error:
        raise CompressionError(f"ai-edge-quantizer could not quantize {mode} ({_summary(error)})") from None
    return bytes(result.quantized_model)


def _calibrate(engine: Any, flatbuffer: bytes, feeds: list[dict[str, Any]]) -> Any:
    """Activation ranges as the min and max over all examples.

    ``Quantizer.calibrate`` keeps a moving average (0.95) of each example's range,
    made for large batches: fed one example at a time (this flatbuffer's batch), it
    clipped a two-head MLP's outputs to a third of their range (MSE 0.011 vs 6e-6).
    """
    from ai_edge_quantizer import calibrator
    from ai_edge_quantizer.utils import qsv_utils

    calibration = calibrator.Calibrator(flatbuffer, num_threads=1, qsv_update_func=qsv_utils.min_max_update)
    calibration.calibrate({_SIGNATURE: feeds}, engine._recipe_manager)  # the quantizer's recipe (0.10 API)
    return calibration.get_model_qsvs()


def _fp16_weights(engine: Any) -> None:
    """float16 weights for every op ai-edge-quantizer can cast (its FLOAT_CASTING algorithm)."""
    from ai_edge_quantizer import qtyping, quantizer
    from ai_edge_quantizer.algorithms.nonlinear_quantize.float_casting import (
        SUPPORTED_WEIGHT_QUANT_OPS,
    )

    config = qtyping.OpQuantizationConfig(
        weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
        compute_precision=qtyping.ComputePrecision.FLOAT,
        explicit_dequantize=True,
    )
    for op in sorted(SUPPORTED_WEIGHT_QUANT_OPS, key=str):
        engine.update_quantization_recipe(regex=".*", operation_name=op, op_config=config,
                                          algorithm_key=quantizer.AlgorithmName.FLOAT_CASTING)


def _calibration_feeds(flatbuffer: bytes, context: Context, limit: int) -> Iterator[dict[str, Any]]:
    """One example at a time (the flatbuffer's batch is 1), keyed by the signature's input names."""
    interpreter = frameworks.analysis_interpreter(flatbuffer)
    runner = interpreter.get_signature_runner(_SIGNATURE)
    details = dict(runner.get_input_details())
    del runner
    dataset = context.calibration_data
    assert dataset is not None
    features = dataset.features
    for name in details:
        if name not in features and not (len(details) == 1 and len(features) == 1):
            raise UsageError(f"the calibration data has no array for the input {name!r}", dataset.path)
    arrays = {name: features[name] if name in features else next(iter(features.values())) for name in details}
    for index in range(min(limit, dataset.size)):
        yield {name: np.asarray(array[index : index + 1], dtype=details[name]["dtype"])
               for name, array in arrays.items()}
