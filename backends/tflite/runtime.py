"""A ``.tflite`` in the LiteRT interpreter (``tf.lite`` when LiteRT is missing), for core to measure.

Every output is returned, named as the model's signature names it (tensor names
for a flatbuffer without signatures), in the signature's order: LiteRT lists a
signature's outputs sorted by name, so a Keras model's heads come alphabetically,
not in the model's order. Integer models take and give int8/uint8/int16
tensors: the runtime shows such inputs and outputs as float32, quantizes what it
is fed and dequantizes what comes out with each tensor's own scale and zero
point, so every variant is fed the same float data and compared in floats.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from compressor.plugin import InvalidInputError, Runtime, TensorSpec, first_line
from compressor_tflite import frameworks

_INTEGER_KINDS = "iu"


class TFLiteRuntime(Runtime):
    """One interpreter, fed by input name, resized to each batch's size unless its batch is fixed."""

    def __init__(self, interpreter: Any, runtime_name: str = "") -> None:
        self.interpreter: Any = interpreter
        self.runtime_name = runtime_name
        self._inputs, self._outputs = named_details(interpreter)
        self.inputs = tuple(_spec(name, detail) for name, detail in self._inputs.items())
        self.outputs = tuple(_spec(name, detail) for name, detail in self._outputs.items())
        self.fixed_batch = _fixed_batch(self._inputs.values())
        self._shapes: dict[int, tuple[int, ...] | None] = {}
        interpreter.allocate_tensors()

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        interpreter = self.interpreter
        for name, detail in self._inputs.items():
            try:
                self._set(detail, feeds[name])
            except (RuntimeError, ValueError) as error:
                shape = list(np.shape(feeds[name]))
                raise InvalidInputError(
                    f"the TFLite interpreter refused input {name!r} {shape}: {first_line(error)}"
                ) from error
        try:
            # Recurrent ops keep their state in variable tensors across calls; each batch is new.
            interpreter.reset_all_variables()
            interpreter.invoke()
        except (RuntimeError, ValueError) as error:
            raise InvalidInputError(f"the TFLite interpreter failed on the inputs: {first_line(error)}") from error
        return {name: _dequantize(interpreter.get_tensor(detail["index"]), detail)
                for name, detail in self._outputs.items()}

    def _set(self, detail: Mapping[str, Any], value: Any) -> None:
        array = _quantize(value, detail)
        index = detail["index"]
        if self._shapes.get(index, tuple(detail["shape"])) != array.shape:
            self._shapes[index] = None  # unknown until the interpreter has taken the new shape
            self.interpreter.resize_tensor_input(index, array.shape, strict=False)
            self.interpreter.allocate_tensors()
            self._shapes[index] = array.shape
        self.interpreter.set_tensor(index, array)

    def metrics(self) -> dict[str, Any]:
        dtypes = [np.dtype(detail["dtype"]).name for detail in self._inputs.values()]
        return {"runtime": self.runtime_name, "input_dtypes": ",".join(dtypes)}

    def close(self) -> None:
        self.interpreter = None


def open_runtime(path: Path, threads: int | None = None) -> TFLiteRuntime:
    """``path`` in a fresh interpreter with ``threads`` threads (a bad file is InvalidInputError)."""
    interpreter_class, name = frameworks.interpreter_class()
    try:
        return TFLiteRuntime(interpreter_class(model_path=str(path), num_threads=threads), name)
    except (ValueError, RuntimeError) as error:
        raise InvalidInputError(f"is not a valid TFLite model ({first_line(error)})", path) from error


def named_details(interpreter: Any) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The interpreter's input and output tensor details by name: the serving (else first)
    signature's names, or tensor names when the flatbuffer has no signature."""
    signatures = interpreter.get_signature_list()
    if signatures:
        key = "serving_default" if "serving_default" in signatures else next(iter(signatures))
        runner = interpreter.get_signature_runner(key)
        inputs, outputs = dict(runner.get_input_details()), dict(runner.get_output_details())
        # A live runner holds the interpreter, which then refuses to reallocate.
        del runner
        return inputs, outputs
    return _by_tensor_name(interpreter.get_input_details()), _by_tensor_name(interpreter.get_output_details())


def _by_tensor_name(details: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    named: dict[str, dict[str, Any]] = {}
    for detail in details:
        name = detail["name"] or f"tensor_{detail['index']}"
        named[name if name not in named else f"{name}#{detail['index']}"] = detail
    return named


def _is_quantized(detail: Mapping[str, Any]) -> bool:
    return np.dtype(detail["dtype"]).kind in _INTEGER_KINDS and detail["quantization"][0] != 0


def _spec(name: str, detail: Mapping[str, Any]) -> TensorSpec:
    signature = detail.get("shape_signature")
    sizes = detail["shape"] if signature is None or len(signature) != len(detail["shape"]) else signature
    shape = tuple(None if size < 0 else int(size) for size in sizes)
    dtype = "float32" if _is_quantized(detail) else np.dtype(detail["dtype"]).name
    return TensorSpec(name, shape, dtype)


def _fixed_batch(details: Iterable[Mapping[str, Any]]) -> int | None:
    """The batch a model converted with a static batch takes (e.g. a GRU's loop): every
    input's first axis fixed to one size; resizing such a model may not work."""
    firsts = set()
    for detail in details:
        signature = detail.get("shape_signature")
        if signature is None or len(signature) == 0:
            continue
        firsts.add(int(signature[0]))
    if len(firsts) != 1 or min(firsts) <= 0:
        return None
    return firsts.pop()


def _quantize(array: Any, detail: Mapping[str, Any]) -> Any:
    dtype = np.dtype(detail["dtype"])
    if not _is_quantized(detail):
        return np.asarray(array, dtype=dtype)
    scale, zero_point = detail["quantization"]
    limits = np.iinfo(dtype)
    quantized = np.round(np.asarray(array, dtype=np.float32) / scale + zero_point)
    return np.clip(quantized, limits.min, limits.max).astype(dtype)


def _dequantize(array: Any, detail: Mapping[str, Any]) -> Any:
    if not _is_quantized(detail):
        return array
    scale, zero_point = detail["quantization"]
    return (array.astype(np.float32) - zero_point) * np.float32(scale)
