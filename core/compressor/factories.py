"""Resolving the user's ``package.module:function`` names (``model_factory=``, ``student=``)."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from compressor.errors import CompressorError, UsageError, first_line


def import_factory(name: object, what: str) -> Callable[..., Any]:
    """The function ``name`` ("package.module:function") names; ``what`` ("model_factory",
    "student") names the setting in the one-line UsageError when it cannot be had.

    The function comes back wrapped: whatever it raises when called (a TypeError for
    ``json:loads``, which needs an argument; a MemoryError; the user's own bug) is a
    UsageError naming the factory and the error's first line, exit 2, not a traceback."""
    text = str(name).strip()
    module_name, _, function_name = text.partition(":")
    if not module_name or not function_name:
        raise UsageError(f"{what} {text!r} is not 'package.module:function'")
    try:
        found = getattr(importlib.import_module(module_name), function_name)
    except Exception as error:  # noqa: BLE001 - importing runs the user's module, which may raise anything
        raise UsageError(f"cannot import {what} {text!r} ({type(error).__name__}: {first_line(error)})") from None
    if not callable(found):
        raise UsageError(f"{what} {text!r} is a {type(found).__name__}, not a function")
    return _reported(found, what, text)


def _reported(function: Callable[..., Any], what: str, text: str) -> Callable[..., Any]:
    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except CompressorError:
            raise
        except Exception as error:  # noqa: BLE001 - the factory is the user's code and may raise anything
            raise UsageError(f"{what} {text!r} raised {type(error).__name__}: {first_line(error)}") from None

    return call
