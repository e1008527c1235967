"""The tensors of a Hugging Face folder's safetensors files, read without a framework.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the bytes. Reading it here (header parsed,
data memory-mapped) keeps the conversion at one tensor in memory at a time and needs
neither torch nor the safetensors package; bfloat16 becomes float32 exactly.

Every byte range is checked against the file before anything is read: a header that
points past the data, overlaps or does not match the shape is a corrupt file (exit 4).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.plugin import InvalidInputError

#: safetensors dtypes to NumPy; BF16 is read as uint16 and widened to float32.
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
          "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
#: A header past this is no real checkpoint's (the format's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies: its file, dtype, shape and byte range in the data section."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors one safetensors file holds, checked against its size; nothing is loaded."""
    try:
        size = path.stat().st_size
        with path.open("rb") as stream:
            head = stream.read(8)
            if len(head) < 8:
                raise InvalidInputError("is not a safetensors file (shorter than its header length)", path)
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise InvalidInputError(f"is not a safetensors file (a header of {length} bytes)", path)
            header = json.loads(stream.read(length).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        if isinstance(error, InvalidInputError):
            raise
        raise InvalidInputError(f"has an unreadable safetensors header ({type(error).__name__})", path) from None
    if not isinstance(header, dict):
        raise InvalidInputError("has a safetensors header that is not a JSON object", path)
    data_bytes = size - 8 - length
    tensors: dict[str, StoredTensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _entry(path, name, entry, data_bytes, 8 + length)
    return tensors


def _entry(path: Path, name: str, entry: Any, data_bytes: int, offset: int) -> StoredTensor:
    import math

    import numpy as np

    try:
        dtype, shape, (start, stop) = entry["dtype"], tuple(int(n) for n in entry["shape"]), entry["data_offsets"]
        start, stop = int(start), int(stop)
    except (KeyError, TypeError, ValueError):
        raise InvalidInputError(f"has a malformed header entry for {name[:80]!r}", path) from None
    if dtype not in DTYPES:
        raise InvalidInputError(f"holds {name[:80]!r} as {str(dtype)[:20]}, not a float or integer type", path)
    expected = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
    if any(n < 0 for n in shape) or not 0 <= start <= stop <= data_bytes or stop - start != expected:
        raise InvalidInputError(f"has a header entry for {name[:80]!r} that does not fit the file "
                                f"(shape {list(shape)}, bytes {start}-{stop} of {data_bytes})", path)
    return StoredTensor(path, dtype, shape, offset + start, offset + stop)


def load(tensor: StoredTensor) -> Any:
    """The tensor as a NumPy array (float32 for bfloat16), copied from a memory map."""
    import numpy as np

    if tensor.stop == tensor.start:
        return np.zeros(tensor.shape, dtype=np.float32 if tensor.dtype == "BF16" else DTYPES[tensor.dtype])
    mapped = np.memmap(tensor.file, dtype=DTYPES[tensor.dtype], mode="r", offset=tensor.start,
                       shape=tensor.shape)
    if tensor.dtype == "BF16":
        return (mapped.astype(np.uint32) << 16).view(np.float32)
    return np.array(mapped)


def folder_tensors(folder: Path, shards: list[str]) -> dict[str, StoredTensor]:
    """Every tensor of the folder's weight files, by name; a name in two files is refused."""
    found: dict[str, StoredTensor] = {}
    for shard in shards:
        for name, tensor in read_header(folder / shard).items():
            if name in found:
                raise InvalidInputError(f"holds the tensor {name[:80]!r} twice ({found[name].file.name} and "
                                        f"{shard})", folder)
            found[name] = tensor
    return found


def weight_files(folder: Path) -> list[str]:
    """The safetensors files transformers would read: the shard index's, else model.safetensors.
    ``check_shards`` of the PyTorch front end refuses an index that points outside the folder."""
    from compressor_frontends.pytorch.hf import check_shards, read_json

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        check_shards(folder)
        weight_map = read_json(folder, index.name).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InvalidInputError(f"{index.name} has no weight_map of tensor names to files", folder)
        return sorted({str(value) for value in weight_map.values()})
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise InvalidInputError("has no model.safetensors or model.safetensors.index.json", folder)
