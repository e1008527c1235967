"""Load ``torch.export`` archives (``.pt2``) without running code stored in them.

``torch.export.load`` unpickles with ``weights_only=False`` whatever the archive
marks as pickled: weights and constants with ``use_pickle: true``, opaque and
custom-class objects, and its sample inputs when the weights-only unpickler
refuses them; it also loads compiled AOTInductor libraries. Without ``--trust``
the archive is inspected first (its zip listing and JSON configs, nothing
unpickled) and refused if it holds any of these, and the load itself runs with
``torch.load`` forced to weights-only, so a payload the inspection did not
foresee still cannot import code.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from compressor.plugin import InvalidInputError, UnsafeInputError, first_line
from compressor_frontends.pytorch.safety import TRUST_HINT

#: Members whose presence means native code or a pickle-only payload.
_CODE_FOLDERS = ("data/aotinductor/", "data/executorch/", "data/mtia")
#: Constants stored as plain tensor bytes; anything else is a pickled object.
_TENSOR_CONSTANT_PREFIX = "tensor_"
#: A config is a few KB per thousand tensors; far larger is not a real archive.
_MAX_CONFIG_BYTES = 256 << 20
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def pickled_entries(path: Path) -> list[str]:
    """What in the archive would be unpickled or executed by ``torch.export.load``."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            found = [*_code_members(infos)]
            for info in infos:
                name = _relative(info.filename)
                if name.startswith("data/") and name.endswith("_config.json"):
                    found += _pickled_in_config(archive, info, name)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as error:
        raise InvalidInputError(f"damaged .pt2 archive ({first_line(error)})", path) from None
    return found


def _relative(member: str) -> str:
    """A member's name below the archive's root folder (``model/data/...`` -> ``data/...``)."""
    return member.split("/", 1)[1] if "/" in member else member


def _code_members(infos: list[zipfile.ZipInfo]) -> Iterator[str]:
    for info in infos:
        name = _relative(info.filename)
        if name.startswith(_CODE_FOLDERS):
            yield f"compiled code ({info.filename})"


def _pickled_in_config(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> list[str]:
    if info.file_size > _MAX_CONFIG_BYTES:
        raise ValueError(f"{info.filename} declares {info.file_size} bytes")
    try:
        entries = json.loads(archive.read(info)).get("config", {})
    except (ValueError, AttributeError, RecursionError):
        raise ValueError(f"{info.filename} is not a readable payload config") from None
    if not isinstance(entries, dict):
        raise ValueError(f"{info.filename} is not a readable payload config")
    constants = name.startswith("data/constants/")
    found = []
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            raise ValueError(f"{info.filename}: entry {fqn!r} is not an object")
        path_name = str(meta.get("path_name", ""))
        if meta.get("use_pickle"):
            found.append(f"pickled {'constant' if constants else 'weight'} {fqn!r}")
        elif constants and not path_name.startswith(_TENSOR_CONSTANT_PREFIX):
            found.append(f"pickled object {fqn!r} ({path_name})")
    return found


def check_exported_program(path: Path, trust: bool) -> None:
    """Refuse an archive that would unpickle or execute code, unless trusted."""
    if trust:
        return
    found = pickled_entries(path)
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise UnsafeInputError(
            f"this .pt2 holds {shown}: loading it would run code stored in it; {TRUST_HINT}", path
        )


@contextmanager
def weights_only_unpickling(trust: bool) -> Iterator[None]:
    """Within the block, every ``torch.load`` is weights-only, even where its caller asks otherwise."""
    if trust:
        yield
        return
    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


#: The ONNX exporter's registry, which says once per process, at WARNING, that it skips each of
#: torchvision's operators (nms, roi_align...) when torchvision is not installed: noise for a
#: program that calls none of them (one that does fails to export, with its own message).
_TORCHVISION_NOTICE_LOGGER = "torch.onnx._internal.exporter._registration"


def load_program(path: Path, trust: bool) -> Any:
    """``torch.export.load`` after :func:`check_exported_program`, weights-only."""
    import logging

    import torch

    logging.getLogger(_TORCHVISION_NOTICE_LOGGER).setLevel(logging.ERROR)
    check_exported_program(path, trust)
    try:
        with weights_only_unpickling(trust):
            return torch.export.load(str(path))
    except pickle.UnpicklingError as error:
        if trust:
            raise InvalidInputError(f"not a readable torch.export program ({first_line(error)})", path) from None
        raise UnsafeInputError(
            f"this .pt2 holds a pickle that needs code to load ({first_line(error, 120)}); {TRUST_HINT}",
            path,
        ) from None
    except Exception as error:  # noqa: BLE001 - torch.export.load raises many types on bad archives
        raise InvalidInputError(
            f"not a readable torch.export program ({type(error).__name__})", path
        ) from None
