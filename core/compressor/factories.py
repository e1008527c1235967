"""Resolving the user's ``package.module:function`` names (``model_factory=``, ``student=``).

The module is imported from the import path, else from the working folder: ``mymodels.py``
next to where the user runs ``compressor`` (or their script or notebook) is found
without ``PYTHONPATH=.``. That folder is appended to ``sys.path`` (after everything
installed, so nothing there shadows a package) and recorded in :func:`factory_folders`,
which the measuring children and Ray workers get on their path for that factory (they
never import from the working folder otherwise, see :mod:`compressor.children`).
A child itself never looks in its working folder.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compressor.errors import CompressorError, UsageError, first_line

#: Folders a factory's module was imported from because it was not on the import path.
_FOLDERS: list[str] = []


def factory_folders() -> list[str]:
    """The working folders factories were found in (for the children's ``PYTHONPATH``)."""
    return list(_FOLDERS)


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
        module = _import(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and module_name.split(".")[0] == error.name.split(".")[0]:
            raise UsageError(_not_found(what, text, module_name)) from None
        raise UsageError(f"cannot import {what} {text!r} ({type(error).__name__}: {first_line(error)})") from None
    except Exception as error:  # noqa: BLE001 - importing runs the user's module, which may raise anything
        raise UsageError(f"cannot import {what} {text!r} ({type(error).__name__}: {first_line(error)})") from None
    found = getattr(module, function_name, None)
    if found is None:
        raise UsageError(f"cannot import {what} {text!r} (module {module_name!r} has no {function_name!r})")
    if not callable(found):
        raise UsageError(f"{what} {text!r} is a {type(found).__name__}, not a function")
    return _reported(found, what, text)


def _import(module_name: str) -> Any:
    """``module_name`` from the import path, else from the working folder (not in a child)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        top = module_name.split(".")[0]
        folder = os.getcwd()
        if error.name != top or _in_child() or not _holds(Path(folder), top):
            raise
    if folder not in sys.path:
        sys.path.append(folder)
    importlib.invalidate_caches()
    module = importlib.import_module(module_name)
    if folder not in _FOLDERS:
        _FOLDERS.append(folder)
    return module


def _in_child() -> bool:
    """A compressor child (``python -P -c BOOTSTRAP``, :func:`compressor.children.python_command`);
    ``python -c`` by hand has the working folder on its path already."""
    argv = getattr(sys, "argv", [])
    # Before Python 3.11 (no -P) the bootstrap is known by its argv: -c, then a compressor module.
    bootstrapped = argv[:1] == ["-c"] and len(argv) > 1 and argv[1].startswith("compressor")
    return bool(getattr(sys.flags, "safe_path", False)) or bootstrapped


def _holds(folder: Path, top: str) -> bool:
    return (folder / f"{top}.py").is_file() or (folder / top / "__init__.py").is_file()


def _not_found(what: str, text: str, module_name: str) -> str:
    top = module_name.split(".")[0]
    here = os.getcwd()
    return (f"cannot import {what} {text!r}: no module {top!r} on the import path or in the working folder "
            f"({here}); run compressor from the folder holding {top}.py (or its package folder {top}/), "
            f"or add that folder to PYTHONPATH: PYTHONPATH=/path/to/folder compressor ...")


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
