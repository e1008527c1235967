"""What a failed quantization says: the runtime's whole reason, and under ``--debug`` the
broken model, kept where the message says.

ONNX Runtime's reasons are long (``[ONNXRuntimeError] : 10 : INVALID_GRAPH : Load model
from ... failed: ... Unrecognized attribute: axis for operator DequantizeLinear``) and the
part that names the problem comes last, so nothing is cut: a normal run gets the reason on
one line (its whitespace folded), ``--debug`` gets it as the runtime wrote it plus the folder
(under the system's temporary directory) holding the model that failed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

#: Set to 1 to keep failed quantizations outside the CLI (the CLI's ``--debug`` does it too).
DEBUG_VARIABLE = "COMPRESSOR_DEBUG"


def debugging() -> bool:
    """``--debug`` was given to the running CLI, or ``COMPRESSOR_DEBUG`` is set."""
    if os.environ.get(DEBUG_VARIABLE, "").strip() not in ("", "0"):
        return True
    try:
        import click
    except ImportError:  # pragma: no cover - click comes with core
        return False
    context = click.get_current_context(silent=True)
    return bool(context is not None and context.find_root().params.get("debug"))


def full_reason(error: BaseException) -> str:
    """The exception's type and complete text."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def shown_reason(error: BaseException) -> str:
    """The complete reason: on one line, or as written under ``--debug``."""
    reason = full_reason(error)
    return reason if debugging() else " ".join(reason.split())


def keep_for_debugging(files: Iterable[Path], label: str) -> Path | None:
    """Under ``--debug``, copy ``files`` (and their ``.data`` side files) into a new folder
    and return it; otherwise None (the scratch folder holding them is deleted as usual)."""
    existing = [path for path in files if path.is_file()]
    if not existing or not debugging():
        return None
    folder = Path(tempfile.mkdtemp(prefix=f"compressor-{label}-"))
    for path in existing:
        shutil.copy2(path, folder / path.name)
        side = path.with_name(path.name + ".data")
        if side.is_file():
            shutil.copy2(side, folder / side.name)
    return folder


def kept_suffix(folder: Path | None) -> str:
    return f" (the model that failed is kept in {folder})" if folder is not None else ""
