"""A saved ONNX model opened in ONNX Runtime (CPU, fixed threads), for core to measure.

Every graph output is returned; ONNX Runtime's own errors on the data (a shape
or type the graph does not take) become one-line data errors naming the input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from compressor.plugin import (
    Artifact,
    InvalidInputError,
    MeasureSettings,
    Runtime,
    TensorSpec,
    UnsupportedError,
    first_line,
)
from compressor_onnx.kv_runtime import (
    CacheBinding,
    cache_hidden,
    cache_layout,
    complete_feeds,
    streamed_weight_bytes,
)

#: ONNX element types as NumPy dtypes (``tensor(float)`` -> ``float32``).
_NUMPY_TYPES = {"float": "float32", "double": "float64", "float16": "float16", "bool": "bool"}


def numpy_type(onnx_type: str) -> str:
    name = onnx_type.removeprefix("tensor(").removesuffix(")")
    return _NUMPY_TYPES.get(name, name)


def open_session(path: Any, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - ORT raises its own exception types
        raise InvalidInputError(f"ONNX Runtime cannot load this model ({first_line(error)})", path) from error


class OnnxRuntime(Runtime):
    def __init__(self, artifact: Artifact, settings: MeasureSettings) -> None:
        self.session = open_session(artifact.path, settings.threads)
        self.inputs = tuple(self._spec(node, artifact) for node in self.session.get_inputs())
        self.outputs = tuple(self._spec(node, artifact) for node in self.session.get_outputs())
        self._names = [spec.name for spec in self.outputs]
        # A causal LM with a key/value cache: core feeds tokens alone, and measures generation too.
        self.kv_cache = cache_layout(self.inputs, tuple(self._names),
                                     self.session.get_modelmeta().custom_metadata_map)
        if self.kv_cache is not None:
            weights = streamed_weight_bytes(artifact.path)
            self.kv_cache = dataclasses.replace(self.kv_cache, weight_bytes=weights or _file_bytes(artifact))
            self.inputs, self.outputs = cache_hidden(self.kv_cache, self.inputs, self.outputs)
            self._bound = CacheBinding(self.session, self.kv_cache, self._names)
        self.fixed_batch = _fixed_batch(self.inputs)

    @staticmethod
    def _spec(node: Any, artifact: Artifact) -> TensorSpec:
        if not str(node.type).startswith("tensor("):
            raise UnsupportedError(
                f"{node.name!r} is a {node.type}: compressor feeds and compares tensors only", artifact.path
            )
        dtype = numpy_type(node.type)
        if dtype == "string":
            raise UnsupportedError(f"{node.name!r} holds strings: compressor feeds and compares numbers only",
                                   artifact.path)
        shape = tuple(dim if isinstance(dim, int) else None for dim in (node.shape or ()))
        return TensorSpec(node.name, shape, dtype)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        try:
            if self.kv_cache:
                return self._bound.run(complete_feeds(self.kv_cache, feeds))
            values = self.session.run(self._names, dict(feeds))
        except Exception as error:  # noqa: BLE001 - ORT's InvalidArgument, Fail, RuntimeException...
            raise InvalidInputError(f"ONNX Runtime refused the inputs: {first_line(error)}") from error
        return dict(zip(self._names, values))

    def metrics(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"runtime": f"onnxruntime {ort.__version__}"}


def _file_bytes(artifact: Artifact) -> int | None:
    try:
        return sum(path.stat().st_size for path in artifact.files)
    except OSError:
        return None


def _fixed_batch(inputs: tuple[TensorSpec, ...]) -> int | None:
    """The batch a graph exported with a static batch takes: every input's first axis
    fixed to one size (a recurrent state with a fixed first axis alone does not count)."""
    firsts = {spec.shape[0] for spec in inputs if spec.shape}
    if not firsts or None in firsts or len(firsts) != 1:
        return None
    return int(next(iter(firsts)))
