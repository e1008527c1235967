"""Keras models and TensorFlow SavedModels exported to ONNX by tf2onnx.

The file is checked and loaded by :mod:`compressor_frontends.keras.loading`
(magic bytes, archive and HDF5 checks, no Lambda layers or custom classes without
``--trust``), then converted to an in-memory ONNX graph with a dynamic batch axis.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from compressor.plugin import CompressionError, InvalidInputError, TensorSpec, first_line
from compressor_frontends.keras import frameworks, loading


def load_as_onnx(path: Path, trust: bool, opset: int) -> Any:
    """The Keras model or SavedModel at ``path`` as a checked ``onnx.ModelProto`` at ``opset``."""
    with frameworks.private_tempdir():
        source, _, inputs = loading.load(path, trust)
        graph = export(source, inputs, opset, path)
    _refuse_unconverted(graph, path)
    _check(graph, path)
    return graph


def export(source: loading.KerasSource, inputs: tuple[TensorSpec, ...], opset: int, path: Path) -> Any:
    """``source`` converted by tf2onnx, its inputs' first axis dynamic (``path`` names it in errors)."""
    tf = frameworks.tensorflow()
    import tf2onnx

    specs = [tf.TensorSpec([None, *spec.shape[1:]], tf.as_dtype(spec.dtype), name=spec.name) for spec in inputs]
    try:
        with warnings.catch_warnings(), frameworks.native_stderr_silenced():
            warnings.simplefilter("ignore")
            if source.keras_model is not None:
                graph, _ = tf2onnx.convert.from_keras(source.keras_model, input_signature=specs, opset=opset)
            else:
                loaded = tf.saved_model.load(str(source.saved_model_dir))
                signature = loaded.signatures["serving_default"]
                names = [spec.name for spec in inputs]
                graph, _ = tf2onnx.convert.from_function(
                    tf.function(lambda *tensors: signature(**dict(zip(names, tensors)))),
                    input_signature=specs, opset=opset,
                )
    except Exception as error:  # noqa: BLE001 - tf2onnx raises anything TensorFlow can
        raise CompressionError(
            f"tf2onnx cannot convert this model ({type(error).__name__}: {_summary(error)}); use --backend tflite",
            path,
        ) from None
    return graph


def _refuse_unconverted(graph: Any, path: Path) -> None:
    """tf2onnx's Python API logs the ops it has no handler for and leaves them in the graph
    under their TensorFlow names; refuse them here, as its command line would."""
    import onnx

    left = [node for node in graph.graph.node
            if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type)]
    if left:
        ops = ", ".join(dict.fromkeys(f"{node.op_type} (at {node.name})" for node in left))
        raise CompressionError(
            f"tf2onnx cannot convert this model (TensorFlow op not supported: {_clip(ops)}); use --backend tflite",
            path,
        )


def _check(graph: Any, path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(graph)
    except (onnx.checker.ValidationError, ValueError) as error:
        raise InvalidInputError(f"tf2onnx made an invalid ONNX graph ({_summary(error)})", path) from None


def _summary(error: BaseException) -> str:
    return _clip(first_line(error) or type(error).__name__)


def _clip(line: str) -> str:
    return line if len(line) <= 200 else line[:197] + "..."
