"""Load models into a :class:`~compressor_onnx.network.Network`: ONNX graphs here,
PyTorch models through the PyTorch front end, Keras models through tf2onnx.

Formats: ``.onnx`` (external data checked before anything reads it); every PyTorch
format of :func:`compressor_frontends.pytorch.loading.load_torch_model` (``.pt2``,
state dicts and ``.safetensors`` with ``--set model_factory``, TorchScript and full
pickles only with ``--trust``, Hugging Face transformers folders), held as a
:class:`~compressor_frontends.pytorch.TorchModel` until its ONNX export; Keras files and
SavedModel folders through tf2onnx (``from_keras.py``, only with ``--backend onnx``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

from compressor.plugin import InvalidInputError, TensorSpec
from compressor_frontends.pytorch.loading import READ_SUFFIXES, load_torch_model
from compressor_frontends.pytorch.shapes import parse_input_shape
from compressor_onnx.network import Network
from compressor_onnx.safety import check_external_data, load_external_data
from compressor_onnx.shapes import graph_input_specs


def load_network(path: Path, options: dict[str, Any], trust: bool) -> tuple[Network, tuple[TensorSpec, ...]]:
    """Read ``path`` into a Network and the TensorSpecs of its inputs."""
    if options.get("input_shape"):
        parse_input_shape(options["input_shape"])  # refused before any file is read, whatever its format
    from compressor_onnx import from_keras

    if from_keras.reads(path):
        return from_keras.load_keras_network(path, options, trust)
    suffix = path.suffix.lower()
    if not path.is_dir() and suffix == ".onnx":
        return load_onnx_network(path)
    if not path.is_dir() and suffix not in READ_SUFFIXES:
        raise InvalidInputError(f"unsupported file type {suffix!r} for the onnx backend", path)
    model, specs = load_torch_model(path, options, trust)
    return Network(torch=model), specs


def load_onnx_network(path: Path) -> tuple[Network, tuple[TensorSpec, ...]]:
    """An ONNX file as an in-memory graph, or by path past the large-model threshold."""
    from compressor_frontends.pytorch.export import large_model_bytes
    from compressor_onnx.external import model_bytes

    skeleton = _parse_onnx(path)
    specs = _token_inputs(skeleton, graph_input_specs(skeleton.graph, path))
    size = model_bytes(path, skeleton)
    if size > large_model_bytes():
        # Checked by path: the checker then reads no weights, and a proto past
        # 2 GB never has to be serialized.
        _check_onnx(path, path)
        return Network(path=path, source_bytes=size), specs
    return Network(graph=_with_external_data(skeleton, path), source_bytes=size), specs


def _token_inputs(skeleton: Any, specs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
    """A causal LM graph with a key/value cache (compressor's export, Optimum's, GenAI's layout)
    takes token ids as data, as its runtime does: the cache and positions are not inputs the
    data must hold, the attention mask is optional."""
    from compressor_onnx.kv_runtime import cache_hidden, graph_cache_layout

    layout = graph_cache_layout(skeleton)
    return specs if layout is None else cache_hidden(layout, specs, ())[0]


def load_onnx(path: Path) -> Any:
    """Parse an ONNX file into memory, checking external data before anything reads it."""
    return _with_external_data(_parse_onnx(path), path)


def _parse_onnx(path: Path) -> Any:
    """The graph without external data, whose locations are checked before anyone follows them."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        graph = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as error:
        raise InvalidInputError(f"not a readable ONNX model ({type(error).__name__})", path) from None
    if not graph.graph.node or not graph.opset_import:
        raise InvalidInputError("not an ONNX model (no graph nodes or opset)", path)
    check_external_data(graph, path)
    return graph


def _with_external_data(graph: Any, path: Path) -> Any:
    """The graph with its external tensors read in, each file opened once and checked as
    opened (``safety.load_external_data``), never by onnx following names itself."""
    try:
        load_external_data(graph, path)
    except (ValueError, OSError) as error:
        _invalid(error, path)
    _check_onnx(graph, path)
    return graph


def _check_onnx(graph_or_path: Any, path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(graph_or_path) if isinstance(graph_or_path, Path) else graph_or_path)
    except (onnx.checker.ValidationError, ValueError, OSError, RuntimeError) as error:
        _invalid(error, path)


def _invalid(error: Exception, path: Path) -> NoReturn:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    raise InvalidInputError(f"invalid ONNX model ({first_line[:200]})", path) from None
