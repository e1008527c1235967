"""Keras and TensorFlow models in the onnx backend (``--backend onnx``), converted by tf2onnx.

The file is checked and loaded by the tflite backend's loader
(:mod:`compressor_tflite.loading`: magic bytes, archive and HDF5 checks, no
Lambda layers or custom classes without ``--trust``), then converted to an
in-memory ONNX graph with a dynamic batch axis, so every onnx technique applies.
"""

from __future__ import annotations

import warnings
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from compressor import CompressionError, InvalidInputError, TensorSpec, UnsupportedError
from compressor.errors import first_line

DEFAULT_OPSET = 17
_INSTALL_HINT = "pip install 'compressor[cross]' (tf2onnx, with compressor[tflite])"


def reads(path: Path) -> bool:
    """Whether ``path`` is a Keras file or SavedModel folder (read only with ``--backend onnx``)."""
    if path.is_dir():
        return (path / "saved_model.pb").is_file()
    return path.suffix.lower() in (".keras", ".h5", ".hdf5")


def load_keras_network(path: Path, options: dict[str, Any], trust: bool) -> tuple[Any, tuple[TensorSpec, ...]]:
    """The Keras model or SavedModel at ``path`` as an ONNX :class:`~compressor_onnx.loading.Network`."""
    missing = [name for name in ("tensorflow", "tf_keras", "tf2onnx") if find_spec(name) is None]
    if missing:
        raise UnsupportedError(
            f"reading Keras models on backend 'onnx' needs {', '.join(missing)}: {_INSTALL_HINT}", path
        )
    from compressor_onnx.loading import Network
    from compressor_tflite import frameworks, loading

    opset = int(options.get("opset") or DEFAULT_OPSET)
    with frameworks.private_tempdir():
        handle, _, inputs = loading.load(path, trust)
        graph = _convert(handle, inputs, opset, path)
    _refuse_unconverted(graph, path)
    _check(graph, path)
    network = Network(graph=graph, input_names=tuple(item.name for item in graph.graph.input),
                      source_bytes=_size(path))
    network_inputs = tuple(_spec(item) for item in graph.graph.input)
    return network, network_inputs


def _convert(handle: Any, inputs: tuple[TensorSpec, ...], opset: int, path: Path) -> Any:
    import tensorflow as tf
    import tf2onnx

    from compressor_tflite import frameworks

    specs = [tf.TensorSpec([None, *spec.shape[1:]], tf.as_dtype(spec.dtype), name=spec.name) for spec in inputs]
    try:
        with warnings.catch_warnings(), frameworks.native_stderr_silenced():
            warnings.simplefilter("ignore")
            if handle.keras_model is not None:
                graph, _ = tf2onnx.convert.from_keras(handle.keras_model, input_signature=specs, opset=opset)
            else:
                loaded = tf.saved_model.load(str(handle.saved_model_dir))
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


def _spec(value: Any) -> TensorSpec:
    import onnx

    tensor = value.type.tensor_type
    shape = tuple(dim.dim_value if dim.HasField("dim_value") else None for dim in tensor.shape.dim)
    return TensorSpec(value.name, shape, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    return path.stat().st_size


def _summary(error: BaseException) -> str:
    return _clip(first_line(error) or type(error).__name__)


def _clip(line: str) -> str:
    return line if len(line) <= 200 else line[:197] + "..."
