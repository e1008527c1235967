"""Read ``.npz`` arrays safely and only as far as needed.

``numpy.load`` reads a whole member even when a run evaluates 100 examples of a
256 MB file. Here each member's ``.npy`` header is read from the zip stream and
then only the first ``limit`` rows (decompressed on the fly for deflated
members), so neither time nor the measuring process's peak RAM depends on
the file's unused rest. Object arrays (pickles) are refused, and a member's
declared size must match its header before anything is allocated.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import IO, Any

from compressor.errors import InvalidInputError

#: Far beyond any real data file's member count: a crafted archive could list millions.
MAX_MEMBERS = 10_000


def read_arrays(path: Path, limit: int | None = None) -> dict[str, Any]:
    """Every array of the archive, each cut to its first ``limit`` rows."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = [info for info in archive.infolist() if info.filename.endswith(".npy")]
            if len(infos) > MAX_MEMBERS:
                raise InvalidInputError(f"holds {len(infos)} arrays; at most {MAX_MEMBERS} are read", path)
            arrays = {}
            for info in infos:
                with archive.open(info) as stream:
                    arrays[info.filename[: -len(".npy")]] = _read_member(stream, info, limit, path)
            return arrays
    except InvalidInputError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as error:
        raise InvalidInputError(f"not a readable .npz data file ({error})", path) from None
    except Exception as error:  # noqa: BLE001 - zipfile and zlib raise a zoo of errors on bad bytes
        raise InvalidInputError(
            f"not a readable .npz data file ({type(error).__name__}: {error})", path
        ) from None


def _read_member(stream: IO[bytes], info: zipfile.ZipInfo, limit: int | None, path: Path) -> Any:
    import numpy as np
    from numpy.lib import format as npy

    version = npy.read_magic(stream)
    reader = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
    if reader is None:
        raise ValueError(f"unsupported .npy version {version}")
    shape, fortran_order, dtype = reader(stream)
    name = info.filename[: -len(".npy")]
    if dtype.hasobject:
        raise InvalidInputError(f"array {name!r} holds Python objects (a pickle); refused", path)
    declared = math.prod(shape) * dtype.itemsize
    if declared > info.file_size:
        raise InvalidInputError(
            f"array {name!r} declares {declared} bytes but the archive holds {info.file_size}", path
        )
    if fortran_order or not shape:
        data = _read_exactly(stream, declared, name, path)
        return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran_order else "C")
    rows = shape[0] if limit is None else min(shape[0], limit)
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    data = _read_exactly(stream, rows * row_bytes, name, path)
    return np.frombuffer(data, dtype).reshape((rows, *shape[1:]))


def _read_exactly(stream: IO[bytes], count: int, name: str, path: Path) -> bytearray:
    """``count`` bytes into a writable buffer (arrays made on it are writable, not copied)."""
    data = bytearray(count)
    view, filled = memoryview(data), 0
    while filled < count:
        got = stream.readinto(view[filled:])  # type: ignore[attr-defined]
        if not got:
            raise InvalidInputError(f"array {name!r} is truncated", path)
        filled += got
    return data
