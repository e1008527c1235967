"""Read a ``.keras`` zip archive without trusting what its members declare.

Every member's declared sizes are checked against the archive before anything
is read: a member that would inflate far beyond its compressed bytes (a zip
bomb), claims more bytes than the archive holds, is encrypted or uses an
unknown compression is refused as corrupt (exit 4). ``config.json`` is read
with a size cap, and the weights are inspected in place (:func:`weights_stream`)
rather than extracted.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from compressor.plugin import InvalidInputError, UnsafeInputError, first_line

CONFIG = "config.json"
WEIGHTS_H5, WEIGHTS_NPZ = "model.weights.h5", "model.weights.npz"
#: tf_keras extracts every member into a temporary folder when there are more
#: than three; a real archive has a handful plus its assets.
MAX_MEMBERS = 10_000
#: A member may inflate to this many times its compressed size...
MAX_RATIO = 100
#: ...once it is larger than this (small JSON compresses 20-50x).
RATIO_FLOOR = 1 << 20
#: The largest config.json read (real ones are at most a few MB).
CONFIG_LIMIT = 64 << 20
_KNOWN_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_LOCAL_HEADER = struct.Struct(zipfile.structFileHeader)


def check_members(archive: zipfile.ZipFile, available: int, path: Path, where: str = "") -> None:
    """Refuse members whose declared sizes do not fit ``available`` bytes or that
    inflate like a zip bomb; ``where`` prefixes messages about a nested archive."""
    infos = archive.infolist()
    if len(infos) > MAX_MEMBERS:
        raise InvalidInputError(f"{where}has {len(infos):,} members, over {MAX_MEMBERS:,}", path)
    for info in infos:
        name = repr(info.filename)[:120]
        if info.flag_bits & 0x1:
            raise InvalidInputError(f"{where}member {name} is encrypted", path)
        if info.compress_type not in _KNOWN_COMPRESSION:
            raise InvalidInputError(
                f"{where}member {name} uses unknown compression method {info.compress_type}", path
            )
        if info.compress_size > available or info.header_offset + info.compress_size > available:
            raise InvalidInputError(
                f"{where}member {name} declares {info.compress_size:,} bytes but the archive has "
                f"{available:,} (truncated or corrupt)",
                path,
            )
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise InvalidInputError(
                f"{where}member {name} is stored uncompressed but declares {info.file_size:,} "
                f"bytes in {info.compress_size:,} (corrupt)",
                path,
            )
        if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * info.compress_size:
            raise InvalidInputError(
                f"{where}member {name} inflates from {info.compress_size:,} to {info.file_size:,} "
                f"bytes (more than {MAX_RATIO}x: a zip bomb or corrupt)",
                path,
            )


def read_config(archive: zipfile.ZipFile, path: Path) -> Any:
    """``config.json`` parsed, read with a size cap."""
    try:
        info = archive.getinfo(CONFIG)
    except KeyError:
        raise InvalidInputError("is a zip archive without config.json, not a .keras model", path) from None
    if info.file_size > CONFIG_LIMIT:
        raise InvalidInputError(
            f"its config.json is {info.file_size:,} bytes, over the {CONFIG_LIMIT:,} read", path
        )
    try:
        with archive.open(info) as stream:
            raw = stream.read(CONFIG_LIMIT + 1)
        if len(raw) > CONFIG_LIMIT:
            raise InvalidInputError(f"its config.json is over the {CONFIG_LIMIT:,} bytes read", path)
        return json.loads(raw)
    except InvalidInputError:
        raise
    except RecursionError:
        raise InvalidInputError("its config.json is nested too deeply to read", path) from None
    except Exception as error:  # noqa: BLE001 - zipfile and json raise a zoo of errors on bad bytes
        raise InvalidInputError(f"is a damaged .keras archive ({first_line(error)})", path) from None


@contextmanager
def member_stream(
    archive: zipfile.ZipFile, outer: IO[bytes], info: zipfile.ZipInfo, available: int
) -> Iterator[IO[bytes]]:
    """A seekable read-only stream of one member, without extracting it: a window on
    ``outer`` when the member is stored (Keras stores its weights), else zipfile's
    decompressing reader (seeking backwards restarts it, but memory stays small)."""
    if info.compress_type != zipfile.ZIP_STORED:
        with archive.open(info) as stream:
            yield stream
        return
    outer.seek(info.header_offset)
    header = outer.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != zipfile.stringFileHeader:
        raise zipfile.BadZipFile(f"bad local header for {info.filename!r}")
    fields = _LOCAL_HEADER.unpack(header)
    start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
    if start + info.file_size > available:
        raise zipfile.BadZipFile(f"member {info.filename!r} runs past the end of the archive")
    yield _Window(outer, start, info.file_size)


class _Window(io.RawIOBase):
    """Bytes ``start`` to ``start + length`` of a seekable binary file."""

    def __init__(self, outer: IO[bytes], start: int, length: int) -> None:
        super().__init__()
        self._outer, self._start, self._length, self._position = outer, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self._length - self._position))
        if count == 0:
            return 0
        self._outer.seek(self._start + self._position)
        read = self._outer.readinto(view[:count])
        self._position += read
        return read


def inspect_keras(path: Path, trust: bool) -> Any:
    """Check a ``.keras`` archive's members and the weights inside it; return its config."""
    from compressor_frontends.keras import hdf5

    available = path.stat().st_size
    try:
        with path.open("rb") as outer, zipfile.ZipFile(outer) as archive:
            check_members(archive, available, path)
            config = read_config(archive, path)
            names = set(archive.namelist())
            if WEIGHTS_H5 in names:
                info = archive.getinfo(WEIGHTS_H5)
                with member_stream(archive, outer, info, available) as stream:
                    hdf5.inspect(stream, path, trust, what=WEIGHTS_H5)
            elif WEIGHTS_NPZ in names:
                info = archive.getinfo(WEIGHTS_NPZ)
                with member_stream(archive, outer, info, available) as stream, \
                        zipfile.ZipFile(stream) as inner:
                    check_members(inner, info.file_size, path, where=f"{WEIGHTS_NPZ}: ")
    except (InvalidInputError, UnsafeInputError):
        raise
    except Exception as error:  # noqa: BLE001 - zipfile raises a zoo of errors on bad bytes
        raise InvalidInputError(f"is a damaged .keras archive ({first_line(error)})", path) from None
    return config
