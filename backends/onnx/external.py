"""ONNX files whose weights live in external data, read and written one tensor at a time.

A *skeleton* is a ModelProto loaded without its external data: nodes, shapes,
small tensors and references (location, offset, length) to the big ones. Big
tensors are read with plain file reads, never a memory map (touched mapped pages
count in the process's RSS until unmapped), and written one by one into a single
``<model>.onnx.data`` next to the new ``.onnx``. Only models whose external data
``check_external_data`` accepted (or that compressor wrote itself) get here, and
every read opens its file through ``safety.open_external`` and reads that
descriptor: a file swapped for a symlink after the load's check is refused (exit
3), one cut short is exit 4, never read past or followed. Saving a model a step wrote moves
its data file into staging (:func:`move_written_model`) rather than writing it again.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Tensors smaller than this stay inside the .onnx (onnx.save's own default).
EMBED_BYTES = 1024
#: Tensors from this size start on an ALIGNMENT boundary, as onnx.save aligns
#: them, so that ONNX Runtime may map them rather than copy them.
ALIGN_FROM_BYTES = 1 << 20
ALIGNMENT = 1 << 16
_COPY_CHUNK = 1 << 24

#: The data files :func:`write_model` wrote in this process -> their ``(device, inode)``:
#: only these may be moved by :func:`move_written_model`, never a user's file.
_written: dict[str, tuple[int, int]] = {}
#: ``os.link`` failures that mean "no hard link here" (another filesystem, none supported).
_NO_LINK_ERRNOS = (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP)

#: Produces one tensor's new contents when the writer reaches it.
Producer = Callable[[], Any]
#: ``progress(message, fraction)``, as ``Context.progress``.
Progress = Callable[[str, float | None], None]


def _silent(message: str, fraction: float | None) -> None:
    return None


def load_skeleton(path: Path) -> Any:
    """The model at ``path`` without its external data."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def all_tensors(model: Any) -> Iterator[Any]:
    """Every tensor of ``model``: initializers, node attributes, subgraphs, functions."""
    from onnx.external_data_helper import _get_all_tensors

    yield from _get_all_tensors(model)


def is_external(tensor: Any) -> bool:
    from onnx import TensorProto

    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def external_reference(tensor: Any) -> tuple[str, int, int]:
    """``(location, offset, length)`` of an external tensor."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    offset = int(entries.get("offset") or 0)
    length = int(entries["length"]) if entries.get("length") else tensor_nbytes(tensor)
    return entries.get("location", ""), offset, length


def tensor_nbytes(tensor: Any) -> int:
    """Bytes the tensor's shape and type call for (0 for strings and sub-byte types)."""
    import math

    from onnx import TensorProto, helper

    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return 0
    itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return math.prod(tensor.dims) * itemsize


def model_bytes(path: Path, skeleton: Any) -> int:
    """The ``.onnx`` file plus every byte of external data its tensors use."""
    external = {external_reference(t) for t in all_tensors(skeleton) if is_external(t)}
    return path.stat().st_size + sum(length for _, _, length in external)


def read_array(tensor: Any, folder: Path) -> Any:
    """One tensor as a numpy array; external bytes are read from ``folder``."""
    import numpy as np
    from onnx import helper, numpy_helper

    from compressor_onnx.safety import read_into

    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    location, offset, length = external_reference(tensor)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    array = np.empty(length // dtype.itemsize, dtype=dtype)
    with _opened(folder, location) as descriptor:
        read_into(descriptor, memoryview(array.view(np.uint8)), offset, location, folder / location)
    return array.reshape(tuple(tensor.dims))


@contextmanager
def _opened(folder: Path, location: str) -> Iterator[int]:
    """A descriptor of ``location`` in ``folder``, checked as opened (``safety.open_external``)."""
    from compressor_onnx.safety import open_external

    descriptor = open_external(folder, location)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


class DataWriter:
    """Appends tensors to one external data file and points the protos at it."""

    def __init__(self, model_path: Path) -> None:
        self.path = model_path.with_name(f"{model_path.name}.data")
        self._stream = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self.written = 0

    def __enter__(self) -> DataWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stream.close()

    def write_array(self, tensor: Any, array: Any) -> None:
        """Store ``array`` as ``tensor``'s contents (its dims and type are set from it)."""
        import numpy as np
        from onnx import helper

        array = np.asarray(array)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        del tensor.dims[:]
        tensor.dims.extend(array.shape)
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        _clear_data(tensor)
        if array.nbytes < EMBED_BYTES:
            tensor.raw_data = array.tobytes()
            return
        self._place(tensor, array.nbytes)
        self._stream.write(memoryview(array.reshape(-1)).cast("B"))

    def copy_tensor(self, tensor: Any, folder: Path) -> None:
        """Move ``tensor``'s bytes (external in ``folder``, or embedded and big) into this file."""
        if is_external(tensor):
            location, offset, length = external_reference(tensor)
            _clear_data(tensor)
            self._place(tensor, length)
            self._stream.flush()
            with _opened(folder, location) as source:
                _copy_range(source, self._stream, offset, length, folder / location)
        elif tensor.HasField("raw_data") and len(tensor.raw_data) >= EMBED_BYTES:
            data = tensor.raw_data
            tensor.ClearField("raw_data")
            self._place(tensor, len(data))
            self._stream.write(data)

    def _place(self, tensor: Any, nbytes: int) -> None:
        from onnx import TensorProto

        position = self._stream.tell()
        if nbytes >= ALIGN_FROM_BYTES and position % ALIGNMENT:
            padding = ALIGNMENT - position % ALIGNMENT
            self._stream.write(b"\0" * padding)
            position += padding
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", position), ("length", nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.written += nbytes


def write_model(
    model: Any, target: Path, source_folder: Path | None, producers: Mapping[str, Producer] | None = None,
    progress: Progress = _silent,
) -> Path | None:
    """Save ``model`` (a skeleton, edited in place) as ``target`` plus one data file.

    Top-level initializers named in ``producers`` get the array their producer
    returns, computed only when the writer reaches them; every other external
    tensor is copied byte for byte from ``source_folder``. Returns the data file,
    or None when every tensor was small enough to stay inside the .onnx.
    """
    import onnx

    producers = dict(producers or {})
    folder = source_folder or target.parent
    count = len(model.graph.initializer)
    with DataWriter(target) as writer:
        for index, tensor in enumerate(model.graph.initializer):
            progress(f"writing {target.name}", index / max(count, 1))
            if tensor.name in producers:
                writer.write_array(tensor, producers.pop(tensor.name)())
            else:
                writer.copy_tensor(tensor, folder)
        for tensor in _nested_tensors(model):
            writer.copy_tensor(tensor, folder)
    onnx.save_model(model, str(target))
    if writer.written == 0:
        writer.path.unlink()
        return None
    written = os.lstat(writer.path)
    _written[str(writer.path)] = (written.st_dev, written.st_ino)
    return writer.path


def move_written_model(model: Any, source: Path, target: Path) -> Path | None:
    """Save ``model`` (the skeleton of ``source``, edited in place) as ``target``, its weights
    not written again: ``source``'s data file is moved to ``target``'s (linked, then its old name
    unlinked, so that it never has two names).

    Only for a data file :func:`write_model` wrote in this process (the same inode, still a
    plain file with one name), holding every external tensor, on the same filesystem as
    ``target``. Returns the new data file, or None (nothing changed) where that does not hold:
    the caller writes the model with :func:`write_model` instead. ``source`` is left without its
    weights: whoever holds it reads ``target`` from now on. The moved file is not
    :func:`write_model`'s any more, so a second save of the same model copies it."""
    import onnx

    from compressor_onnx.safety import all_tensors as every_tensor

    data = source.with_name(f"{source.name}.data")
    try:
        found = os.lstat(data)
    except OSError:
        return None
    if (_written.get(str(data)) != (found.st_dev, found.st_ino) or not stat.S_ISREG(found.st_mode)
            or found.st_nlink != 1):
        return None
    external = [tensor for tensor in every_tensor(model) if is_external(tensor)]
    if not external or any(external_reference(tensor)[0] != data.name for tensor in external):
        return None
    moved = target.with_name(f"{target.name}.data")
    try:
        os.link(data, moved, follow_symlinks=False)  # never replaces a file already there
    except OSError as error:
        if error.errno in _NO_LINK_ERRNOS:
            return None
        raise
    linked = os.lstat(moved)
    if (linked.st_dev, linked.st_ino) != (found.st_dev, found.st_ino):  # swapped since it was checked
        moved.unlink()
        return None
    try:
        for tensor in external:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = moved.name
        onnx.save_model(model, str(target))
        os.unlink(data)
    except BaseException:
        moved.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
        raise
    del _written[str(data)]
    return moved


def _nested_tensors(model: Any) -> Iterator[Any]:
    """Tensors other than the top-level initializers: subgraph initializers, node attributes."""
    from onnx.external_data_helper import (
        _get_attribute_tensors,
        _get_initializer_tensors_from_graph,
        _recursive_attribute_processor,
    )

    for node in model.graph.node:
        for attribute in node.attribute:
            yield from _recursive_attribute_processor(attribute, _get_initializer_tensors_from_graph)
    yield from _get_attribute_tensors(model)


def _clear_data(tensor: Any) -> None:
    from onnx import TensorProto

    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.DEFAULT


def _copy_range(source: int, target: Any, offset: int, length: int, where: Path) -> None:
    """Copy ``length`` bytes from ``offset`` of the opened ``source`` to the end of ``target``
    (in the kernel when it can); a source that ends early (cut short after it was
    checked) is exit 4."""
    from compressor.plugin import InvalidInputError

    remaining = length
    position = offset
    try:
        while remaining:
            copied = os.copy_file_range(source, target.fileno(), min(remaining, 1 << 30), position)
            if copied == 0:
                break
            remaining -= copied
            position += copied
    except (OSError, AttributeError):
        pass
    if remaining:
        target.seek(0, os.SEEK_END)
        while remaining:
            chunk = os.pread(source, min(remaining, _COPY_CHUNK), position)
            if not chunk:
                raise InvalidInputError(f"external data ends {remaining} bytes early, at {position} bytes "
                                        "(cut short after it was checked?)", where)
            target.write(chunk)
            remaining -= len(chunk)
            position += len(chunk)
    target.seek(0, os.SEEK_END)
