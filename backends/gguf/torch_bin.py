"""The tensors of a Hugging Face folder's ``pytorch_model.bin`` (or its shards), for folders
without safetensors: read weights-only (``torch.load(weights_only=True)``, no code runs; a full
pickle is refused, exit 3) and memory-mapped (``mmap=True``), so the converter still holds
about one tensor at a time. Needs torch (``compressor[torch]``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.plugin import InvalidInputError, UnsafeInputError, UnsupportedError, first_line

SINGLE = "pytorch_model.bin"
INDEX = "pytorch_model.bin.index.json"
#: torch dtypes to the safetensors names the converter uses.
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class BinTensor:
    """One tensor of a ``.bin`` file: its file, name, dtype (safetensors' name) and shape."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]


def has_bin(folder: Path) -> bool:
    return (folder / SINGLE).is_file() or (folder / INDEX).is_file()


def bin_files(folder: Path) -> list[str]:
    """The shard index's files (plain names in the folder only), else pytorch_model.bin."""
    if not (folder / INDEX).is_file():
        return [SINGLE]
    try:
        weight_map = json.loads((folder / INDEX).read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, RecursionError, AttributeError) as error:
        raise InvalidInputError(f"has an unreadable {INDEX} ({first_line(error)})", folder) from None
    if not isinstance(weight_map, dict):
        raise InvalidInputError(f"{INDEX} has no weight_map of tensor names to files", folder)
    files = sorted({str(value) for value in weight_map.values()})
    for name in files:
        if name != Path(name).name or name in (".", "..") or (folder / name).is_symlink():
            raise UnsafeInputError(f"{INDEX} points at {name[:120]!r}: shards must be plain files in the folder",
                                   folder)
    return files


def open_state(path: Path) -> dict[str, Any]:
    """The file's state dict, weights-only and memory-mapped."""
    import pickle

    try:
        import torch
    except ImportError:
        raise UnsupportedError("reading pytorch_model.bin needs torch (pip install 'compressor[torch]'); "
                               "safetensors folders do not", path) from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise UnsafeInputError(f"is not a weights-only checkpoint ({first_line(error)}); compressor never "
                               "unpickles code", path) from None
    except Exception as error:  # noqa: BLE001 - a damaged file raises any exception type
        raise InvalidInputError(f"unreadable PyTorch file ({type(error).__name__}: {first_line(error)})",
                                path) from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise InvalidInputError("holds no state dict of tensors", path)
    return state


def bin_tensors(folder: Path) -> dict[str, BinTensor]:
    found: dict[str, BinTensor] = {}
    for name in bin_files(folder):
        for key, tensor in open_state(folder / name).items():
            dtype = DTYPES.get(str(tensor.dtype).removeprefix("torch."))
            if dtype is None:
                raise InvalidInputError(f"holds {key[:80]!r} as {tensor.dtype}, not a float type", folder / name)
            if key in found:
                raise InvalidInputError(f"holds the tensor {key[:80]!r} twice", folder)
            found[key] = BinTensor(folder / name, key, dtype, tuple(tensor.shape))
    return found


def load_bin(tensor: BinTensor) -> Any:
    """The tensor as a float32 NumPy array, copied out of the mapping (released afterwards)."""
    state = open_state(tensor.file)
    return state[tensor.name].float().numpy().copy()
