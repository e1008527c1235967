"""Start Python child processes that import nothing from the working directory.

``python -m module`` puts the current directory first on ``sys.path``, so a
``json.py`` or ``fasttext.py`` in the folder the user runs compressor from would
run inside the child. Children are started with ``-c`` and a bootstrap that
drops that entry before anything is imported (plus ``-P`` where Python has it),
and with ``PYTHONPATH`` rebuilt from the parent's ``sys.path`` minus the
working directory (kept only where the user's ``PYTHONPATH`` names it by its
absolute path), so plugins registered in-process still reach them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

#: Runs ``MODULE.main(argv)`` and exits with its result. ``sys.path[0]`` is the
#: working directory ('') under ``-c`` without ``-P``; it goes before any import.
_BOOTSTRAP = (
    "import sys\n"
    "if sys.path and sys.path[0] in ('', '.'): del sys.path[0]\n"
    "import importlib\n"
    "sys.exit(importlib.import_module(sys.argv[1]).main(sys.argv[2:]))\n"
)


def python_command(module: str, arguments: Sequence[str] = ()) -> list[str]:
    """The command line that runs ``module.main(arguments)`` in a fresh interpreter."""
    flags = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *flags, "-c", _BOOTSTRAP, module, *arguments]


def import_path(cwd: str | None = None) -> str:
    """The parent's ``sys.path`` as ``PYTHONPATH``, without the working directory, unless
    the user's own ``PYTHONPATH`` names it by its absolute path (a model factory kept
    there must import in the child too)."""
    here = os.path.realpath(cwd or os.getcwd())
    named = {os.path.realpath(entry) for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep)
             if os.path.isabs(entry)}
    kept = [
        entry for entry in sys.path
        if entry and entry != "." and (os.path.realpath(entry) != here or here in named)
    ]
    return os.pathsep.join(dict.fromkeys(kept))


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` plus ``extra``, with ``PYTHONPATH`` from :func:`import_path`."""
    environment = dict(os.environ)
    environment.update(extra or {})
    environment["PYTHONPATH"] = import_path()
    # Debugging hooks that import arbitrary modules at start-up have no place here.
    environment.pop("PYTHONSTARTUP", None)
    return environment
