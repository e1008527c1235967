"""Recognise, check and load Keras files (``.keras``, ``.h5``) and SavedModel folders.

Every file is checked before TensorFlow sees it: its magic bytes must match its
suffix, and its Keras config must not hold Lambda layers or custom classes
(code that would run while loading) unless the user passed ``--trust``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.plugin import InvalidInputError, TensorSpec, UnsafeInputError, first_line
from compressor_frontends.keras import archives, frameworks, hdf5

KERAS, H5, SAVED_MODEL = "keras", "h5", "saved_model"
#: A TFLite flatbuffer: not loaded here, but recognised by its bytes, so a Keras file
#: that is really one is named as such (and a backend reading ``.tflite`` checks it here).
TFLITE = "tflite"
SUFFIX_FORMATS = {".keras": KERAS, ".h5": H5, ".hdf5": H5}
FORMAT_NAMES = {
    KERAS: "Keras v3 archive (.keras)",
    H5: "Keras HDF5 file (.h5)",
    TFLITE: "TFLite flatbuffer (.tflite)",
}
_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_TFLITE_IDENTIFIER = b"TFL3"
#: Classes from these modules ship with Keras; anything else is user code.
_KERAS_MODULES = ("keras", "tf_keras", "builtins")
_TRUST_HINT = "pass --trust only if you trust where the file came from"

#: Tells whether a config entry with a ``class_name`` names a class that ships with Keras.
KnownClass = Callable[[dict[str, Any]], bool]


@dataclass
class KerasSource:
    """A loaded Keras model, or a plain TensorFlow SavedModel folder (no Keras metadata)
    that TensorFlow's converters read from disk."""

    keras_model: Any | None = None
    saved_model_dir: Path | None = None


def model_format(path: Path) -> str | None:
    """The Keras format ``path`` claims by its suffix (or SavedModel folder layout)."""
    if path.is_dir():
        return SAVED_MODEL if (path / "saved_model.pb").is_file() else None
    return SUFFIX_FORMATS.get(path.suffix.lower())


def sniff(path: Path) -> str | None:
    """The format the first bytes of ``path`` show, whatever its suffix."""
    with path.open("rb") as stream:
        head = stream.read(8)
    if head.startswith(_ZIP_MAGIC):
        return KERAS
    if head == _HDF5_MAGIC:
        return H5
    if head[4:8] == _TFLITE_IDENTIFIER:
        return TFLITE
    return None


def check_contents(path: Path, claimed: str) -> None:
    """Refuse empty files and files whose bytes are not what their suffix says."""
    if path.stat().st_size == 0:
        raise InvalidInputError("is empty", path)
    actual = sniff(path)
    if actual == claimed:
        return
    if actual is None:
        raise InvalidInputError(
            f"is not a {FORMAT_NAMES[claimed]}: unrecognised contents (corrupt?)", path
        )
    raise InvalidInputError(
        f"has a {path.suffix} suffix but is a {FORMAT_NAMES[actual]}; rename it", path
    )


def load(path: Path, trust: bool) -> tuple[KerasSource, str, tuple[TensorSpec, ...]]:
    """Check and load the Keras file or SavedModel folder ``path``; its source, format and inputs."""
    fmt = model_format(path)
    if fmt is None:
        raise InvalidInputError(
            "not a Keras file (.keras, .h5) or SavedModel folder (with saved_model.pb)", path
        )
    if fmt == SAVED_MODEL:
        return _load_saved_model(path, trust)
    check_contents(path, fmt)
    # Before Keras opens anything: sizes, HDF5 links to other files, then code.
    config = archives.inspect_keras(path, trust) if fmt == KERAS else _h5_config(path, trust)
    refuse_unsafe(path, config, trust, known_class=_keras_class_checker(fmt))
    model = _load_keras(path, trust)
    return KerasSource(keras_model=model), fmt, keras_inputs(model, path)


def refuse_unsafe(path: Path, config: Any, trust: bool, known_class: KnownClass) -> None:
    if trust:
        return
    found = sorted(set(_unsafe_objects(config, known_class)))
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise UnsafeInputError(
            f"holds {shown}, which would run code while loading; {_TRUST_HINT}", path
        )


def _unsafe_objects(config: Any, known_class: KnownClass) -> Iterator[str]:
    # A loop, not recursion: a config nested thousands deep is refused, not a RecursionError.
    pending = [config]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            class_name = node.get("class_name")
            if class_name == "Lambda":
                inner = node.get("config")
                name = inner.get("name", "?") if isinstance(inner, dict) else "?"
                yield f"a Lambda layer ({str(name)[:80]!r})"
            elif isinstance(class_name, str) and not known_class(node):
                yield f"custom class {class_name[:80]!r}"
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)


def _keras_class_checker(fmt: str) -> KnownClass:
    if fmt == KERAS:
        # The v3 format records each class's module; Keras's own start with "keras".
        def known(entry: dict[str, Any]) -> bool:
            module = entry.get("module")
            return module is None or str(module).split(".")[0] in _KERAS_MODULES

        return known
    keras = frameworks.keras()
    namespaces = (
        keras.layers,
        keras.initializers,
        keras.regularizers,
        keras.constraints,
        keras.mixed_precision,
        keras.optimizers,
    )
    builtin_names = {"Functional", "Sequential", "Model", "TFOpLambda", "SlicingOpLambda"}

    def known_h5(entry: dict[str, Any]) -> bool:
        name = entry["class_name"]
        return name in builtin_names or any(hasattr(space, name) for space in namespaces)

    return known_h5


def _h5_config(path: Path, trust: bool) -> Any:
    config = hdf5.inspect(path, path, trust, config=True)
    if config is None:
        raise InvalidInputError(
            "holds no model_config: it is a weights-only file, not a whole Keras model", path
        )
    return config


def _load_keras(path: Path, trust: bool) -> Any:
    keras = frameworks.keras()
    try:
        return keras.models.load_model(path, compile=False, safe_mode=not trust)
    except Exception as error:  # noqa: BLE001 - Keras raises anything from ValueError to KeyError
        raise InvalidInputError(f"cannot load the Keras model ({first_line(error)})", path) from None


def _load_saved_model(path: Path, trust: bool) -> tuple[KerasSource, str, tuple[TensorSpec, ...]]:
    check_assets(path)
    _check_fingerprint(path)
    metadata = path / "keras_metadata.pb"
    if metadata.is_file():
        frameworks.keras()  # sets TF_USE_LEGACY_KERAS before tf_keras imports TensorFlow
        from tf_keras.protobuf import saved_metadata_pb2

        saved = saved_metadata_pb2.SavedMetadata()
        try:
            saved.ParseFromString(metadata.read_bytes())
            nodes = [json.loads(node.metadata) for node in saved.nodes]
        except Exception as error:  # noqa: BLE001 - protobuf's DecodeError and JSON errors
            raise InvalidInputError(f"has a damaged keras_metadata.pb ({first_line(error)})", path) from None
        # Custom classes are revived from the saved graph without their code; Lambda is not.
        refuse_unsafe(path, nodes, trust, known_class=lambda entry: True)
        model = _load_keras(path, trust)
        return KerasSource(keras_model=model), SAVED_MODEL, keras_inputs(model, path)
    tf = frameworks.tensorflow()
    try:
        loaded = tf.saved_model.load(str(path))
        signature = loaded.signatures["serving_default"]
    except KeyError:
        raise InvalidInputError("SavedModel has no 'serving_default' signature", path) from None
    except Exception as error:  # noqa: BLE001 - TensorFlow raises many error types on bad protobufs
        raise InvalidInputError(f"cannot load the SavedModel ({first_line(error)})", path) from None
    specs = signature.structured_input_signature[1]
    inputs = tuple(
        TensorSpec(name, tuple(spec.shape.as_list()), spec.dtype.name)
        for name, spec in sorted(specs.items())
    )
    return KerasSource(saved_model_dir=path), SAVED_MODEL, inputs


def asset_names(path: Path) -> list[str]:
    """The file names a SavedModel's graphs give their assets (``asset_file_def``, and the
    TF1 ``saved_model_assets`` collection), read from ``saved_model.pb`` without loading it."""
    frameworks.tensorflow()
    from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString((path / "saved_model.pb").read_bytes())
    except Exception as error:  # noqa: BLE001 - protobuf's DecodeError, OSError
        raise InvalidInputError(f"has a damaged saved_model.pb ({first_line(error)})", path) from None
    names = []
    for graph in saved.meta_graphs:
        names += [asset.filename for asset in graph.asset_file_def]
        collection = graph.collection_def.get("saved_model_assets")
        for packed in collection.any_list.value if collection is not None else ():
            asset = meta_graph_pb2.AssetFileDef()
            if packed.Unpack(asset):
                names.append(asset.filename)
    return names


def check_assets(path: Path) -> None:
    """Refuse (exit 3) an asset named outside the SavedModel's ``assets`` folder: TensorFlow
    joins the name to that folder and reads whatever it leads to while loading (a
    lookup table's vocabulary), so ``../../outside`` or an absolute name, or a symlink
    leaving the folder, would load another file's contents into the model."""
    assets = path / "assets"
    root = Path(os.path.realpath(assets))
    for name in asset_names(path):
        shown = name[:120]
        if not name or os.path.isabs(name) or ".." in Path(name).parts:
            raise UnsafeInputError(f"names the asset {shown!r}, outside its assets folder; "
                                   "a SavedModel's assets must sit in it", path)
        if not Path(os.path.realpath(assets / name)).is_relative_to(root):
            raise UnsafeInputError(f"asset {shown!r} leads outside its assets folder (through a symlink)", path)


def _check_fingerprint(path: Path) -> None:
    """TensorFlow loads past a damaged ``fingerprint.pb`` but logs a traceback on stderr for it."""
    if not (path / "fingerprint.pb").is_file():
        return
    tf = frameworks.tensorflow()
    try:
        tf.saved_model.experimental.read_fingerprint(str(path))
    except Exception as error:  # noqa: BLE001 - TensorFlow raises RuntimeError, DecodeError...
        raise InvalidInputError(f"has a damaged fingerprint.pb ({first_line(error)})", path) from None


def keras_inputs(model: Any, path: Path) -> tuple[TensorSpec, ...]:
    """The inputs of a loaded Keras model; a lone layer or an unbuilt model has none to feed."""
    if not isinstance(model, frameworks.keras().Model):
        raise InvalidInputError(f"holds a single {type(model).__name__} layer, not a Keras model", path)
    if not model.inputs or any(tensor.shape.rank is None for tensor in model.inputs):
        raise InvalidInputError(
            "holds a model without defined input shapes (a Sequential saved before it was built?)",
            path,
        )
    return tuple(
        TensorSpec(name, tuple(tensor.shape.as_list()), tensor.dtype.name)
        for name, tensor in zip(model.input_names, model.inputs)
    )
