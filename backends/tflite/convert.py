"""Convert a Keras model or SavedModel (loaded by the Keras front end) to a TFLite flatbuffer:
fp32, fp16, dynamic, int8, uint8, int16x8."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compressor.plugin import CompressionError, Dataset, TensorSpec
from compressor_tflite import frameworks
from compressor_tflite.handle import TFLiteHandle

FULL_INTEGER_MODES = ("int8", "uint8", "int16x8")
#: The type of a full-integer model's input and output tensors, by mode.
_IO_TYPES = {"int8": "int8", "uint8": "uint8", "int16x8": "int16"}
#: Ops that only move values between float and integer; they are not "left in float".
_BOUNDARY_OPS = {"QUANTIZE", "DEQUANTIZE"}


@dataclass
class Conversion:
    flatbuffer: bytes
    #: Ops of a full-integer model that still compute in float, e.g. "SIN (model/tf.math.sin/Sin)".
    float_ops: list[str] = field(default_factory=list)


def convert(
    handle: TFLiteHandle,
    mode: str | None,
    inputs: Sequence[TensorSpec] = (),
    calibration: Dataset | None = None,
    calibration_samples: int = 200,
    allow_float_fallback: bool = False,
) -> Conversion:
    """Convert ``handle`` with quantization ``mode`` (None keeps fp32)."""
    tf = frameworks.tensorflow()
    loops = _looping_recurrent_layers(handle.keras_model) if handle.keras_model is not None else []
    if loops and mode in FULL_INTEGER_MODES:
        # TFLite 2.21's calibrator crashes the process (SIGSEGV) on these loops.
        raise CompressionError(
            f"quantize {mode} of {', '.join(loops)} layers crashes TFLite's calibrator; "
            "use quantize dynamic or fp16 for this model, or LSTM layers"
        )

    def configured(fallback: bool, static_batch: bool) -> Any:
        converter = _converter(tf, handle, static_batch)
        # No EXPERIMENTAL_SPARSITY: its sparse encoding is larger than dense int8 below ~80%
        # sparsity and XNNPACK cannot run it; dense zeros survive quantization and gzip well.
        converter.optimizations = [tf.lite.Optimize.DEFAULT] if mode else []
        if mode == "fp16":
            converter.target_spec.supported_types = [tf.float16]
        elif mode in FULL_INTEGER_MODES:
            if calibration is None:
                raise CompressionError(f"quantize {mode} needs --calibration-data")
            converter.representative_dataset = lambda: _representative(
                calibration, inputs, calibration_samples
            )
            integer_ops = [
                tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
                if mode == "int16x8" else tf.lite.OpsSet.TFLITE_BUILTINS_INT8
            ]
            converter.target_spec.supported_ops = (
                [*integer_ops, tf.lite.OpsSet.TFLITE_BUILTINS] if fallback else integer_ops
            )
            io_type = getattr(tf, _IO_TYPES[mode])
            converter.inference_input_type = io_type
            converter.inference_output_type = io_type
        return converter

    def attempt(fallback: bool) -> bytes:
        # Recurrent layers TFLite cannot fuse into one op (GRU; stacked LSTMs returning
        # sequences) lower to TensorList ops, which need a static batch size.
        if loops:
            return _run(configured(fallback, static_batch=True))
        try:
            return _run(configured(fallback, static_batch=False))
        except CompressionError:
            raise
        except Exception as error:  # noqa: BLE001 - the converter raises ConverterError and others
            if handle.keras_model is None:
                raise
            try:
                return _run(configured(fallback, static_batch=True))
            except Exception:  # noqa: BLE001
                raise error from None

    try:
        flatbuffer = attempt(allow_float_fallback)
    except CompressionError:
        raise
    except Exception as error:  # noqa: BLE001 - the converter raises ConverterError and others
        if mode not in FULL_INTEGER_MODES or allow_float_fallback:
            raise CompressionError(f"TFLite conversion failed: {_summary(error)}") from None
        flatbuffer = _fallback_or_fail(attempt, mode, error)
    conversion = Conversion(flatbuffer)
    if mode in FULL_INTEGER_MODES:
        conversion.float_ops = float_ops(flatbuffer)
        if conversion.float_ops and not allow_float_fallback:
            raise _not_quantizable(mode, conversion.float_ops)
    return conversion


def _fallback_or_fail(attempt: Any, mode: str, error: Exception) -> bytes:
    """A strict conversion failed: convert with float fallback only to name the culprits."""
    try:
        flatbuffer = attempt(True)
    except Exception:  # noqa: BLE001
        raise CompressionError(f"TFLite conversion failed: {_summary(error)}") from None
    raise _not_quantizable(mode, float_ops(flatbuffer) or [_summary(error)])


def _looping_recurrent_layers(model: Any) -> list[str]:
    """Class names of recurrent layers that TFLite converts to a while loop: all but LSTM,
    which becomes one fused op."""
    keras = frameworks.keras()
    return sorted({
        type(layer).__name__
        for layer in _all_layers(model)
        if isinstance(layer, keras.layers.RNN) and not isinstance(layer, keras.layers.LSTM)
    })


def _all_layers(model: Any) -> Iterator[Any]:
    for layer in model.layers:
        yield layer
        inner = getattr(layer, "layer", None) or getattr(layer, "forward_layer", None)
        if inner is not None:
            yield inner
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _run(converter: Any) -> bytes:
    # The converter warns that float input "statistics" are missing: they come from calibration.
    with warnings.catch_warnings(), frameworks.native_stderr_silenced():
        warnings.simplefilter("ignore", UserWarning)
        return converter.convert()


def _not_quantizable(mode: str, ops: list[str]) -> CompressionError:
    return CompressionError(
        f"ops that cannot be quantized to {mode}: {'; '.join(ops)}; "
        "--set allow_float_fallback=true keeps them in float"
    )


def _converter(tf: Any, handle: TFLiteHandle, static_batch: bool) -> Any:
    model = handle.keras_model
    if model is not None and static_batch:
        specs = [
            tf.TensorSpec([1, *tensor.shape[1:]], tensor.dtype, name=name)
            for name, tensor in zip(model.input_names, model.inputs)
        ]
        function = tf.function(lambda *tensors: model(list(tensors) if len(tensors) > 1 else tensors[0], training=False))
        return tf.lite.TFLiteConverter.from_concrete_functions(
            [function.get_concrete_function(*specs)], model
        )
    if model is not None:
        return tf.lite.TFLiteConverter.from_keras_model(model)
    if handle.saved_model_dir is not None:
        return tf.lite.TFLiteConverter.from_saved_model(str(handle.saved_model_dir))
    raise CompressionError("the model is already a .tflite flatbuffer; load the Keras model to convert")


def _representative(
    dataset: Dataset, inputs: Sequence[TensorSpec], limit: int
) -> Iterator[list[Any]]:
    features = dataset.features
    names = [spec.name for spec in inputs] or list(features)
    arrays = [np.asarray(features[name], dtype=np.float32) for name in names]
    for index in range(min(limit, dataset.size)):
        yield [array[index : index + 1] for array in arrays]


def float_ops(flatbuffer: bytes) -> list[str]:
    """Ops computing in float32, named with their first output tensor, counted by kind."""
    interpreter = frameworks.analysis_interpreter(flatbuffer)
    tensors = {detail["index"]: detail["name"] for detail in interpreter.get_tensor_details()}
    found: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for op in interpreter._get_ops_details():
        if op["op_name"] in _BOUNDARY_OPS:
            continue
        types = [*op["operand_types"], *op["result_types"]]
        if any(np.dtype(kind) == np.float32 for kind in types):
            found[op["op_name"]] += 1
            outputs = [index for index in op["outputs"] if index >= 0]
            examples.setdefault(op["op_name"], tensors.get(outputs[0], "?") if outputs else "?")
    return [
        f"{name} x{count} (e.g. {examples[name]})" if count > 1 else f"{name} ({examples[name]})"
        for name, count in sorted(found.items())
    ]


def _summary(error: BaseException) -> str:
    """The converter's first useful line; its messages run to pages of MLIR locations."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if "error:" in line] or lines or [type(error).__name__]
    line = useful[0]
    return line if len(line) <= 300 else line[:297] + "..."
