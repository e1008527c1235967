"""Recognise, check and load Keras files, SavedModel folders and ``.tflite`` flatbuffers.

Every file is checked before TensorFlow sees it: its magic bytes must match its
suffix, and its Keras config must not hold Lambda layers or custom classes
(code that would run while loading) unless the user passed ``--trust``.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from compressor import InvalidInputError, TensorSpec, UnsafeInputError
from compressor.errors import first_line
from compressor_tflite import frameworks
from compressor_tflite.handle import TFLiteHandle

KERAS, H5, SAVED_MODEL, TFLITE = "keras", "h5", "saved_model", "tflite"
SUFFIX_FORMATS = {".keras": KERAS, ".h5": H5, ".hdf5": H5, ".tflite": TFLITE}
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


def model_format(path: Path) -> str | None:
    """The format ``path`` claims by its suffix (or SavedModel folder layout)."""
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


def load(path: Path, trust: bool) -> tuple[TFLiteHandle, str, tuple[TensorSpec, ...]]:
    """Load ``path`` and return its handle, format and inputs."""
    fmt = model_format(path)
    if fmt is None:
        raise InvalidInputError(
            "not a Keras file (.keras, .h5), SavedModel folder (with saved_model.pb) or .tflite",
            path,
        )
    if fmt == TFLITE:
        check_contents(path, fmt)
        flatbuffer = path.read_bytes()
        return TFLiteHandle(flatbuffer=flatbuffer), fmt, flatbuffer_inputs(flatbuffer, path)
    if fmt == SAVED_MODEL:
        return _load_saved_model(path, trust)
    check_contents(path, fmt)
    config = _keras_archive_config(path) if fmt == KERAS else _h5_config(path)
    refuse_unsafe(path, config, trust, known_class=_keras_class_checker(fmt))
    model = _load_keras(path, trust)
    return TFLiteHandle(keras_model=model), fmt, keras_inputs(model)


def refuse_unsafe(path: Path, config: Any, trust: bool, known_class: KnownClass) -> None:
    if trust:
        return
    found = sorted(set(_unsafe_objects(config, known_class)))
    if found:
        raise UnsafeInputError(
            f"holds {', '.join(found)}, which would run code while loading; {_TRUST_HINT}", path
        )


def _unsafe_objects(config: Any, known_class: KnownClass) -> Iterator[str]:
    if isinstance(config, dict):
        class_name = config.get("class_name")
        if class_name == "Lambda":
            name = (config.get("config") or {}).get("name", "?")
            yield f"a Lambda layer ({name!r})"
        elif isinstance(class_name, str) and not known_class(config):
            yield f"custom class {class_name!r}"
        for value in config.values():
            yield from _unsafe_objects(value, known_class)
    elif isinstance(config, list):
        for value in config:
            yield from _unsafe_objects(value, known_class)


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


def _keras_archive_config(path: Path) -> Any:
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    except KeyError:
        raise InvalidInputError("is a zip archive without config.json, not a .keras model", path) from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise InvalidInputError(f"is a damaged .keras archive ({first_line(error)})", path) from None


def _h5_config(path: Path) -> Any:
    import h5py

    try:
        with h5py.File(path, "r") as file:
            raw = file.attrs.get("model_config")
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"is a damaged HDF5 file ({first_line(error)})", path) from None
    if raw is None:
        raise InvalidInputError(
            "holds no model_config: it is a weights-only file, not a whole Keras model", path
        )
    try:
        return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except ValueError as error:
        raise InvalidInputError(f"has an unreadable model_config ({error})", path) from None


def _load_keras(path: Path, trust: bool) -> Any:
    keras = frameworks.keras()
    try:
        return keras.models.load_model(path, compile=False, safe_mode=not trust)
    except Exception as error:  # noqa: BLE001 - Keras raises anything from ValueError to KeyError
        raise InvalidInputError(f"cannot load the Keras model ({first_line(error)})", path) from None


def _load_saved_model(path: Path, trust: bool) -> tuple[TFLiteHandle, str, tuple[TensorSpec, ...]]:
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
        return TFLiteHandle(keras_model=model), SAVED_MODEL, keras_inputs(model)
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
    return TFLiteHandle(saved_model_dir=path), SAVED_MODEL, inputs


def keras_inputs(model: Any) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(name, tuple(tensor.shape.as_list()), tensor.dtype.name)
        for name, tensor in zip(model.input_names, model.inputs)
    )


def flatbuffer_inputs(flatbuffer: bytes, path: Path) -> tuple[TensorSpec, ...]:
    """Inputs of a ``.tflite`` as float tensors: measuring quantizes integer inputs itself."""
    from compressor_tflite.measure import TFLiteSession

    interpreter_class, _ = frameworks.interpreter_class()
    try:
        with frameworks.native_stderr_silenced():
            session = TFLiteSession(interpreter_class(model_content=flatbuffer))
    except ValueError as error:
        raise InvalidInputError(f"is not a valid TFLite model ({first_line(error)})", path) from None
    return session.input_specs()

