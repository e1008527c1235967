"""The LiteRT interpreter (TensorFlow Lite's successor), imported lazily.

TensorFlow, tf-keras and tensorflow-model-optimization are the Keras front end's
(:mod:`compressor_frontends.keras.frameworks`); they are named here too, so this
backend's modules take every framework from one place.
"""

from __future__ import annotations

from typing import Any

from compressor_frontends.keras.frameworks import (
    keras,
    model_optimization,
    native_stderr_silenced,
    private_tempdir,
    tensorflow,
)

__all__ = [
    "analysis_interpreter",
    "interpreter_class",
    "interpreter_module",
    "keras",
    "model_optimization",
    "native_stderr_silenced",
    "private_tempdir",
    "tensorflow",
]


def interpreter_module() -> str:
    """The module :func:`interpreter_class` takes the interpreter from, found without importing it."""
    from importlib.util import find_spec

    try:
        found = find_spec("ai_edge_litert") is not None
    except (ImportError, ValueError):
        found = False
    return "ai_edge_litert.interpreter" if found else "tensorflow"


def interpreter_class() -> tuple[Any, str]:
    """The LiteRT interpreter (TensorFlow Lite's successor), else ``tf.lite.Interpreter``."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return tensorflow().lite.Interpreter, "tf.lite"
    return Interpreter, "ai-edge-litert"


def analysis_interpreter(flatbuffer: bytes) -> Any:
    """An interpreter without the default XNNPACK delegate, so op details show real kernels."""
    interpreter, runtime = interpreter_class()
    if runtime == "ai-edge-litert":
        from ai_edge_litert.interpreter import OpResolverType
    else:
        OpResolverType = tensorflow().lite.experimental.OpResolverType  # noqa: N806
    return interpreter(
        model_content=flatbuffer,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
