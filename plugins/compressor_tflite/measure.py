"""Run and time a ``.tflite`` with the LiteRT interpreter (or ``tf.lite`` when LiteRT is missing).

Integer models take and give int8/uint8 tensors; a :class:`TFLiteSession`
quantizes float inputs and dequantizes outputs with each tensor's own scale and
zero-point, so every variant is fed the same float data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from compressor import (
    Artifact,
    Dataset,
    InvalidInputError,
    Measurement,
    MeasureSettings,
    Stopwatch,
    TensorSpec,
    time_calls,
)
from compressor.errors import first_line
from compressor_tflite import frameworks

_INTEGER_KINDS = "iu"


class TFLiteSession:
    """One interpreter, fed by input name, resized to each batch's size."""

    def __init__(self, interpreter: Any) -> None:
        self.interpreter = interpreter
        signatures = interpreter.get_signature_list()
        if signatures:
            key = "serving_default" if "serving_default" in signatures else next(iter(signatures))
            runner = interpreter.get_signature_runner(key)
            self.inputs: dict[str, dict[str, Any]] = dict(runner.get_input_details())
            outputs = runner.get_output_details()
            self.output = outputs[sorted(outputs)[0]]
            # A live runner holds the interpreter, which then refuses to reallocate.
            del runner
        else:
            self.inputs = {detail["name"]: detail for detail in interpreter.get_input_details()}
            self.output = interpreter.get_output_details()[0]
        self._shapes: dict[int, tuple[int, ...]] = {}
        interpreter.allocate_tensors()

    def input_specs(self) -> tuple[TensorSpec, ...]:
        specs = []
        for name, detail in self.inputs.items():
            shape = tuple(None if size < 0 else int(size) for size in detail["shape_signature"])
            dtype = np.dtype(detail["dtype"])
            quantized = dtype.kind in _INTEGER_KINDS and detail["quantization"][0] != 0
            specs.append(TensorSpec(name, shape, "float32" if quantized else dtype.name))
        return tuple(specs)

    @property
    def batch_is_fixed(self) -> bool:
        """Converted with a static batch (e.g. a GRU's loop): resizing it may not work."""
        return all(
            len(detail["shape_signature"]) > 0 and detail["shape_signature"][0] > 0
            for detail in self.inputs.values()
        )

    @property
    def input_dtypes(self) -> list[str]:
        return [np.dtype(detail["dtype"]).name for detail in self.inputs.values()]

    def arrange(self, features: Mapping[str, Any]) -> list[Any]:
        """The data's arrays in the interpreter's input order, matched by name or position."""
        if set(self.inputs) <= set(features):
            return [features[name] for name in self.inputs]
        if len(features) == len(self.inputs):
            return list(features.values())
        raise InvalidInputError(
            f"the model's inputs are {', '.join(self.inputs)}; the data has {', '.join(features)}"
        )

    def run(self, arrays: list[Any]) -> Any:
        """Float outputs of one batch; every array has the same first dimension."""
        interpreter = self.interpreter
        for detail, array in zip(self.inputs.values(), arrays):
            index = detail["index"]
            if self._shapes.get(index, tuple(detail["shape"])) != array.shape:
                interpreter.resize_tensor_input(index, array.shape, strict=False)
                self._shapes[index] = array.shape
                interpreter.allocate_tensors()
        for detail, array in zip(self.inputs.values(), arrays):
            interpreter.set_tensor(detail["index"], _quantize(array, detail))
        # Recurrent ops keep their state in variable tensors across calls; each batch is new.
        interpreter.reset_all_variables()
        interpreter.invoke()
        return _dequantize(interpreter.get_tensor(self.output["index"]), self.output)


def _quantize(array: Any, detail: Mapping[str, Any]) -> Any:
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail["quantization"]
    if dtype.kind not in _INTEGER_KINDS or scale == 0:
        return np.asarray(array, dtype=dtype)
    limits = np.iinfo(dtype)
    quantized = np.round(np.asarray(array, dtype=np.float32) / scale + zero_point)
    return np.clip(quantized, limits.min, limits.max).astype(dtype)


def _dequantize(array: Any, detail: Mapping[str, Any]) -> Any:
    scale, zero_point = detail["quantization"]
    if np.dtype(detail["dtype"]).kind not in _INTEGER_KINDS or scale == 0:
        return np.asarray(array, dtype=np.float32)
    return (array.astype(np.float32) - zero_point) * np.float32(scale)


def predict(session: TFLiteSession, arrays: list[Any], batch_size: int) -> Any:
    """Outputs for every example, one row each, in batches (one by one if the model
    cannot be resized to a larger batch)."""
    total = len(arrays[0])
    if session.batch_is_fixed:
        batch_size = 1
    rows = []
    start = 0
    while start < total:
        stop = min(start + batch_size, total)
        try:
            output = session.run([array[start:stop] for array in arrays])
        except (RuntimeError, ValueError):
            if batch_size == 1:
                raise
            batch_size = 1
            continue
        rows.append(output.reshape(stop - start, -1))
        start = stop
    return np.concatenate(rows)


def top1(outputs: Any) -> Any:
    if outputs.shape[1] == 1:
        return (outputs[:, 0] > 0.5).astype(np.int64)
    return outputs.argmax(axis=1)


def _example(session: TFLiteSession, arrays: list[Any] | None) -> list[Any]:
    if arrays is not None:
        return [array[:1] for array in arrays]
    return [
        np.zeros(tuple(1 if size is None else size for size in spec.shape), dtype=spec.dtype)
        for spec in session.input_specs()
    ]


def measure(artifact: Artifact, data: Dataset | None, settings: MeasureSettings) -> Measurement:
    interpreter_class, runtime = frameworks.interpreter_class()
    with Stopwatch() as load:
        try:
            interpreter = interpreter_class(
                model_path=str(artifact.path), num_threads=settings.threads
            )
            session = TFLiteSession(interpreter)
        except (ValueError, RuntimeError) as error:
            raise InvalidInputError(f"is not a valid TFLite model ({first_line(error)})", artifact.path) from None
    arrays = None
    if data is not None:
        arrays = session.arrange(data.features)
        if settings.max_examples is not None:
            arrays = [array[: settings.max_examples] for array in arrays]
    example = _example(session, arrays)
    metrics: dict[str, Any] = {
        "load_ms": load.ms,
        "latency_ms": time_calls(lambda: session.run(example), settings),
        "runtime": runtime,
        "input_dtypes": ",".join(session.input_dtypes),
    }
    if arrays is None:
        return Measurement(metrics=metrics)
    outputs = predict(session, arrays, settings.batch_size)
    return Measurement(metrics=metrics, predictions=top1(outputs), outputs=outputs)

