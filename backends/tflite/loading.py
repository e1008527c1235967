"""Recognise and load what the tflite backend reads: ``.tflite`` flatbuffers here, Keras
files and SavedModel folders through the Keras front end
(:mod:`compressor_frontends.keras.loading`, which checks each before TensorFlow sees it).
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from compressor.plugin import InvalidInputError, TensorSpec, first_line
from compressor_frontends.keras import loading as keras_loading
from compressor_tflite import frameworks
from compressor_tflite.handle import TFLiteHandle

TFLITE = keras_loading.TFLITE


def model_format(path: Path) -> str | None:
    """The format ``path`` claims by its suffix (or SavedModel folder layout)."""
    if not path.is_dir() and path.suffix.lower() == ".tflite":
        return TFLITE
    return keras_loading.model_format(path)


def load(path: Path, trust: bool) -> tuple[TFLiteHandle, str, tuple[TensorSpec, ...]]:
    """Load ``path`` and return its handle, format and inputs."""
    fmt = model_format(path)
    if fmt is None:
        raise InvalidInputError(
            "not a Keras file (.keras, .h5), SavedModel folder (with saved_model.pb) or .tflite",
            path,
        )
    if fmt == TFLITE:
        keras_loading.check_contents(path, fmt)
        inputs = probe_inputs(path)
        return TFLiteHandle(flatbuffer=path.read_bytes()), fmt, inputs
    source, fmt, inputs = keras_loading.load(path, trust)
    return TFLiteHandle(keras_model=source.keras_model, saved_model_dir=source.saved_model_dir), fmt, inputs


def session_inputs(flatbuffer: bytes, path: Path) -> tuple[TensorSpec, ...]:
    """Inputs of a ``.tflite`` as the runtime takes them: quantized integer inputs as float32,
    since measuring quantizes them itself (:mod:`compressor_tflite.runtime`).

    Runs the interpreter on untrusted bytes: call it in a child (:func:`probe_inputs`).
    """
    from compressor_tflite.runtime import TFLiteRuntime

    interpreter_class, _ = frameworks.interpreter_class()
    try:
        with frameworks.native_stderr_silenced():
            runtime = TFLiteRuntime(interpreter_class(model_content=flatbuffer))
    except (ValueError, RuntimeError) as error:
        raise InvalidInputError(f"is not a valid TFLite model ({first_line(error)})", path) from None
    return runtime.inputs


#: Inputs of files a child already opened without trouble, by (path, size, mtime_ns).
_PROBED: dict[tuple[str, int, int], tuple[TensorSpec, ...]] = {}


def probe_inputs(path: Path) -> tuple[TensorSpec, ...]:
    """:func:`session_inputs` of ``path``, run in a child process (see probe.py)."""
    from compressor.plugin import child_environment, python_command

    status = path.stat()
    key = (str(path.resolve()), status.st_size, status.st_mtime_ns)
    if key in _PROBED:
        return _PROBED[key]
    timeout = 120 + status.st_size / 20e6
    try:
        result = subprocess.run(
            python_command("compressor_tflite.probe", [str(path)]),
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
            env=child_environment({"TF_CPP_MIN_LOG_LEVEL": "3"}),
        )
    except subprocess.TimeoutExpired:
        raise InvalidInputError(f"the TFLite interpreter did not open it in {timeout:.0f} s", path) from None
    if result.returncode < 0:
        name = signal.Signals(-result.returncode).name
        raise InvalidInputError(f"is not a valid TFLite model (the interpreter crashed opening it: {name})", path)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        errors = result.stderr.strip().splitlines()
        detail = errors[-1][:300] if errors else f"the interpreter exited with {result.returncode}"
        raise InvalidInputError(detail if detail.startswith("is not") else f"cannot be opened: {detail}", path)
    specs = tuple(TensorSpec.from_json(spec) for spec in json.loads(lines[-1]))
    _PROBED[key] = specs
    return specs
