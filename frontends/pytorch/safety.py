"""Safe reading of PyTorch files: format sniffing and ``torch.load``.

Everything here runs before torch parses the file, so a hostile file is refused
with a clear error instead of reaching a loader that would run its pickled code.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from compressor.plugin import InvalidInputError, UnsafeInputError, first_line

ZIP_MAGIC = b"PK\x03\x04"
#: ``torch.save``'s legacy (non-zip) format starts with a pickled magic number.
LEGACY_PICKLE_MAGIC = b"\x80\x02"
TRUST_HINT = "pass --trust only if you trust whoever made this file"


def zip_members(path: Path) -> list[str]:
    """Names inside a zip archive; a damaged archive is an invalid input."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise InvalidInputError(f"damaged zip archive ({error})", path) from None


def torch_file_kind(path: Path) -> str:
    """``"torchscript"``, ``"torch_zip"`` (``torch.save``) or ``"legacy_pickle"``."""
    head = _head(path, 4)
    if head.startswith(ZIP_MAGIC):
        members = zip_members(path)
        if any(name.endswith("constants.pkl") or "/code/" in name for name in members):
            return "torchscript"
        if any(name.endswith("data.pkl") for name in members):
            return "torch_zip"
        raise InvalidInputError("zip archive without a PyTorch payload (no data.pkl)", path)
    if head.startswith(LEGACY_PICKLE_MAGIC):
        return "legacy_pickle"
    raise InvalidInputError("not a PyTorch file (neither a torch.save zip nor a pickle)", path)


def safe_torch_load(path: Path, trust: bool) -> Any:
    """``torch.load`` with ``weights_only=True``; full pickles only when trusted.

    A damaged pickle makes the weights-only unpickler raise almost anything
    (IndexError, KeyError, TypeError, struct.error...): every such failure is a
    corrupt file (exit 4), only a refused global means code (exit 3)."""
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about odd protocols before failing
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not _refused_global(error):
            raise InvalidInputError(f"unreadable PyTorch file ({first_line(error)})", path) from None
        if not trust:
            raise UnsafeInputError(
                "this file is a full pickle: loading it would run code stored in it; "
                + TRUST_HINT,
                path,
            ) from None
    except Exception as error:  # noqa: BLE001 - a damaged pickle raises any exception type
        raise InvalidInputError(
            f"unreadable PyTorch file ({type(error).__name__}: {first_line(error)})", path
        ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - trusted pickles can raise anything
        raise InvalidInputError(
            f"could not unpickle ({type(error).__name__}: {first_line(error)})", path
        ) from None


def _refused_global(error: Exception) -> bool:
    """True when the weights-only unpickler refused a global (code), not bad bytes."""
    text = str(error)
    return "Unsupported global" in text or "GLOBAL" in text or "not an allowed global" in text


def _head(path: Path, size: int) -> bytes:
    try:
        with path.open("rb") as stream:
            return stream.read(size)
    except OSError as error:
        raise InvalidInputError(f"cannot read ({error.strerror})", path) from None
