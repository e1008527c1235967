"""Safe reading of untrusted ONNX files' external data (PyTorch files:
:mod:`compressor_frontends.pytorch.safety`).

Everything here runs before onnx or ONNX Runtime opens the data, so a hostile file
is refused with a clear error instead of reaching a loader that would follow its paths.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.plugin import InvalidInputError, UnsafeInputError


@dataclass(frozen=True)
class ExternalTensor:
    """One initializer whose bytes live in a side file."""

    name: str
    location: str
    offset: int
    length: int | None
    #: Bytes the tensor's dims and type call for (None for strings).
    expected_bytes: int | None


def all_tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of ``model``: initializers, sparse initializers' values and
    indices, and tensors in node attributes (Constant values), in every subgraph."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _attribute_tensors(node)


def _graph_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _attribute_tensors(node)


def _attribute_tensors(node: Any) -> Iterator[Any]:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("sparse_tensor"):
            yield attribute.sparse_tensor.values
            yield attribute.sparse_tensor.indices
        for sparse in attribute.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for subgraph in attribute.graphs:
            yield from _graph_tensors(subgraph)


def external_tensors(model: Any, path: Path) -> list[ExternalTensor]:
    """The tensors of ``model`` (an unloaded ModelProto) stored outside the file."""
    import math

    from onnx import TensorProto, helper

    found = []
    for tensor in all_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        expected = None
        if tensor.data_type not in _UNSIZED_TYPES:
            try:
                itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            except (KeyError, ValueError, TypeError):
                raise InvalidInputError(
                    f"tensor {tensor.name!r} has an unknown data type ({tensor.data_type})", path
                ) from None
            expected = math.prod(tensor.dims) * itemsize
        found.append(
            ExternalTensor(
                name=tensor.name,
                location=entries.get("location", ""),
                offset=_number(entries.get("offset", "0") or "0", "offset", tensor.name, path),
                length=_number(entries["length"], "length", tensor.name, path) if entries.get("length") else None,
                expected_bytes=expected,
            )
        )
    return found


def _number(text: str, field: str, tensor: str, path: Path) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidInputError(
            f"tensor {tensor!r} has a non-numeric external-data {field} ({text[:40]!r})", path
        ) from None


#: STRING, UINT4, INT4, FLOAT4E2M1: no fixed byte size per element.
_UNSIZED_TYPES = {8, 21, 22, 23}


def check_external_data(model: Any, path: Path) -> None:
    """Refuse external data outside the model's folder, missing or too short.

    Checked by us before onnx or ONNX Runtime open anything, because both follow
    ``location`` wherever it points. Each file is checked as opened
    (:func:`open_external`); whoever reads it later opens and checks it again
    (``external.read_array``, :func:`load_external_data`), so a file swapped for a
    symlink after this check is still never read."""
    with ExternalFiles(path) as files:
        for tensor in external_tensors(model, path):
            files.check(tensor)


def load_external_data(model: Any, path: Path) -> None:
    """Read every external tensor of ``model`` into the proto from files opened once and
    checked as opened; the bytes are those of the checked descriptor, exactly as many
    as declared (a file cut short meanwhile is exit 4)."""
    from onnx import TensorProto

    protos = [proto for proto in all_tensors(model) if proto.data_location == TensorProto.EXTERNAL]
    with ExternalFiles(path) as files:
        # external_tensors walks all_tensors in the same order.
        for proto, tensor in zip(protos, external_tensors(model, path), strict=True):
            data = files.read(tensor)
            del proto.external_data[:]
            proto.data_location = TensorProto.DEFAULT
            proto.raw_data = data


class ExternalFiles:
    """The external-data files of the model at ``path``, each opened once
    (:func:`open_external`) and read through that descriptor only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._opened: dict[str, int] = {}

    def __enter__(self) -> ExternalFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for descriptor in self._opened.values():
            os.close(descriptor)
        self._opened.clear()

    def check(self, tensor: ExternalTensor) -> tuple[int, int]:
        """The opened file of ``tensor`` and the end of its bytes, both checked."""
        path = self.path
        if tensor.offset < 0 or (tensor.length is not None and tensor.length < 0):
            raise InvalidInputError(f"tensor {tensor.name!r} has a negative offset or length", path)
        needed = tensor.length if tensor.length is not None else tensor.expected_bytes
        if tensor.expected_bytes is not None and needed != tensor.expected_bytes:
            raise InvalidInputError(
                f"tensor {tensor.name!r} declares {needed} bytes of external data, "
                f"its shape needs {tensor.expected_bytes}",
                path,
            )
        if tensor.location not in self._opened:
            self._opened[tensor.location] = open_external(path.parent, tensor.location, path, tensor.name)
        descriptor = self._opened[tensor.location]
        end = tensor.offset + (needed or 0)
        size = os.fstat(descriptor).st_size
        if size < end:
            raise InvalidInputError(
                f"external data file {tensor.location!r} is shorter ({size} bytes) "
                f"than tensor {tensor.name!r} needs ({end} bytes)",
                path,
            )
        return descriptor, end

    def read(self, tensor: ExternalTensor) -> bytes:
        descriptor, end = self.check(tensor)
        return read_range(descriptor, tensor.offset, end - tensor.offset, tensor.location, self.path)


#: Opened without following a symlink, blocking on a FIFO or taking a terminal.
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))


def open_external(folder: Path, location: str, model: Path | None = None, tensor: str | None = None) -> int:
    """A descriptor of external data ``location`` in ``folder``, checked as opened:
    a regular file, not a symlink, whose real path (``/proc/self/fd``) lies in the folder.

    The name is checked first (relative, no ``..``, not a symlink: onnx refuses those
    too), then opened with ``O_NOFOLLOW`` and checked again on the descriptor, which
    is what the caller reads: a file swapped for a symlink (or a folder on the way
    for another) between the check and the read is refused, never read."""
    where = model if model is not None else folder / location
    what = f"tensor {tensor!r}: {location!r}" if tensor else repr(location)
    if not location:
        raise InvalidInputError(f"tensor {tensor!r} has external data without a location", where)
    if os.path.isabs(location) or Path(location).is_absolute():
        raise UnsafeInputError(
            f"{what} is an absolute path; external data must sit in the model's own folder", where
        )
    if ".." in Path(location).parts:
        raise UnsafeInputError(f"{what} points outside the model's folder", where)
    root = folder.resolve()
    name = folder / location
    if not name.resolve().is_relative_to(root):
        raise UnsafeInputError(f"{what} leads outside the model's folder (through a symlink)", where)
    if name.is_symlink():
        raise InvalidInputError(f"external data file {location!r} is a symbolic link; put the file itself in "
                                "the model's folder", where)
    try:
        descriptor = os.open(name, _OPEN_FLAGS)
    except FileNotFoundError:
        raise InvalidInputError(f"external data file {location!r} is missing", where) from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnsafeInputError(f"{what} became a symlink while being checked", where) from None
        raise InvalidInputError(f"cannot open external data file {location!r} ({error.strerror})", where) from None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise InvalidInputError(f"external data {location!r} is not a regular file", where)
        if not opened_path(descriptor, name).is_relative_to(root):
            raise UnsafeInputError(f"{what} leads outside the model's folder (through a symlink)", where)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def opened_path(descriptor: int, name: Path) -> Path:
    """The real path of the file open as ``descriptor`` (where the kernel found it, not
    where ``name`` leads now); without ``/proc``, ``name`` resolved if it is that file."""
    try:
        link = os.readlink(f"/proc/self/fd/{descriptor}")
    except OSError:
        real = Path(os.path.realpath(name))
        opened, found = os.fstat(descriptor), real.stat()
        if (opened.st_dev, opened.st_ino) != (found.st_dev, found.st_ino):
            raise UnsafeInputError("changed while being checked", name) from None
        return real
    if link.endswith(" (deleted)") or not link.startswith("/"):
        raise InvalidInputError("was removed while being checked", name)
    return Path(link)


def read_range(descriptor: int, offset: int, length: int, location: str, where: Path) -> bytes:
    """Exactly ``length`` bytes at ``offset`` of the opened file; fewer is exit 4
    (a file cut short after it was checked)."""
    buffer = bytearray(length)
    read_into(descriptor, memoryview(buffer), offset, location, where)
    return bytes(buffer)


def read_into(descriptor: int, view: memoryview, offset: int, location: str, where: Path) -> None:
    """Fill the byte view ``view`` from ``offset`` of the opened file; a file that ends first is exit 4."""
    done, length = 0, len(view)
    while done < length:
        count = os.preadv(descriptor, [view[done:done + (1 << 30)]], offset + done)
        if count == 0:
            raise InvalidInputError(
                f"external data file {location!r} ends at {offset + done} bytes, {offset + length} needed "
                "(cut short after it was checked?)", where)
        done += count
