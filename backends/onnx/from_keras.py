"""Keras and TensorFlow models in the onnx backend (``--backend onnx``).

The Keras front end checks and loads the file and exports it with tf2onnx
(:func:`compressor_frontends.keras.to_onnx.load_as_onnx`: magic bytes, archive and
HDF5 checks, no Lambda layers or custom classes without ``--trust``); the in-memory
ONNX graph, with a dynamic batch axis, becomes a :class:`~compressor_onnx.network.Network`,
so every onnx technique applies.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import Any

from compressor.plugin import TensorSpec, UnsupportedError

DEFAULT_OPSET = 17
_INSTALL_HINT = "pip install 'compressor[cross]' (tf2onnx, with compressor[tflite])"


def reads(path: Path) -> bool:
    """Whether ``path`` is a Keras file or SavedModel folder (read only with ``--backend onnx``)."""
    if path.is_dir():
        return (path / "saved_model.pb").is_file()
    return path.suffix.lower() in (".keras", ".h5", ".hdf5")


def load_keras_network(path: Path, options: dict[str, Any], trust: bool) -> tuple[Any, tuple[TensorSpec, ...]]:
    """The Keras model or SavedModel at ``path`` as an ONNX :class:`~compressor_onnx.network.Network`."""
    missing = [name for name in ("tensorflow", "tf_keras", "tf2onnx") if find_spec(name) is None]
    if missing:
        raise UnsupportedError(
            f"reading Keras models on backend 'onnx' needs {', '.join(missing)}: {_INSTALL_HINT}", path
        )
    from compressor_frontends.keras.to_onnx import load_as_onnx
    from compressor_onnx.network import Network

    graph = load_as_onnx(path, trust, int(options.get("opset") or DEFAULT_OPSET))
    network = Network(graph=graph, input_names=tuple(item.name for item in graph.graph.input),
                      source_bytes=_size(path))
    network_inputs = tuple(_spec(item) for item in graph.graph.input)
    return network, network_inputs


def _spec(value: Any) -> TensorSpec:
    import onnx

    tensor = value.type.tensor_type
    shape = tuple(dim.dim_value if dim.HasField("dim_value") else None for dim in tensor.shape.dim)
    return TensorSpec(value.name, shape, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    return path.stat().st_size
