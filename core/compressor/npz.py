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
from collections.abc import Collection
from pathlib import Path
from typing import IO, Any

from compressor.errors import InvalidInputError
from compressor.models import Dataset, TensorSpec

#: Far beyond any real data file's member count: a crafted archive could list millions.
MAX_MEMBERS = 10_000


def read_arrays(path: Path, limit: int | None = None, uncut: Collection[str] = ()) -> dict[str, Any]:
    """Every array of the archive, each but those in ``uncut`` cut to its first ``limit`` rows."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = [info for info in archive.infolist() if info.filename.endswith(".npy")]
            if len(infos) > MAX_MEMBERS:
                raise InvalidInputError(f"holds {len(infos)} arrays; at most {MAX_MEMBERS} are read", path)
            arrays = {}
            for info in infos:
                with archive.open(info) as stream:
                    name = info.filename[: -len(".npy")]
                    arrays[name] = _read_member(stream, info, None if name in uncut else limit, path)
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


def read_npz(path: Path, inputs: tuple[TensorSpec, ...], limit: int | None = None) -> Dataset:
    """Read an ``.npz`` with one array per input (or ``x``) and labels in ``y``,
    checking names, dtypes, shapes, lengths and finiteness against ``inputs``;
    only the first ``limit`` examples are read. Examples run along each input's
    ``batch_axis``; an input without one (a 0-d array: a sample rate) is the same
    for every example. An optional input the file lacks is left out, with a
    note (the model then uses its default)."""
    import numpy as np

    axes = {spec.name: spec.batch_axis for spec in inputs}
    arrays = read_arrays(path, limit, uncut=[name for name, axis in axes.items() if axis != 0])
    labels = arrays.pop("y", None)
    specs = inputs or (TensorSpec("x", (), "float32"),)
    features: dict[str, Any] = {}
    notes = []
    sizes: dict[str, int] = {}
    for spec in specs:
        if spec.name in arrays:
            array = arrays[spec.name]
        elif len(specs) == 1 and "x" in arrays:
            array = arrays["x"]
        elif spec.optional:
            notes.append(f"{path.name} has no {spec.name!r}; the model's default is used for it")
            continue
        else:
            expected = ", ".join(s.name for s in specs)
            raise InvalidInputError(
                f"has arrays {sorted(arrays) or 'none'} but the model's inputs are: {expected} "
                f"(name arrays like the inputs, or 'x' for a single input)",
                path,
            )
        axis = None if array.ndim == 0 or not inputs else spec.batch_axis
        if not inputs:
            axis = 0 if array.ndim else None
        if axis is not None and axis >= array.ndim:
            raise InvalidInputError(f"array {spec.name!r} has {array.ndim} axes; its batch axis is {axis}", path)
        if axis not in (0, None) and limit is not None:
            array = np.take(array, np.arange(min(limit, array.shape[axis])), axis=axis)
        features[spec.name] = _check_array(path, spec, array, bool(inputs), axis)
        if axis is not None:
            sizes[spec.name] = array.shape[axis]
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{name}: {size}" for name, size in sizes.items())
        raise InvalidInputError(
            f"inputs have different numbers of examples ({shown}); for an input whose examples run "
            "along another axis, or that is the same for all, --set batch_axis.NAME=K (or =none)",
            path,
        )
    size = next(iter(sizes.values()), 1)
    if size == 0:
        raise InvalidInputError("holds no examples", path)
    if labels is not None:
        if labels.ndim != 1 or len(labels) != size:
            raise InvalidInputError(
                f"labels 'y' have shape {labels.shape}, expected ({size},): one label per example",
                path,
            )
        if labels.dtype.kind not in "iu":
            raise InvalidInputError(f"labels 'y' must be integers, not {labels.dtype}", path)
    return Dataset(path=path, features=features, labels=labels, size=size, notes=notes)


def _check_array(path: Path, spec: TensorSpec, array: Any, strict: bool, axis: int | None) -> Any:
    import numpy as np

    if not strict:
        _check_finite(path, spec.name, array)
        return array
    expected_kind = np.dtype(spec.dtype).kind if _known_dtype(spec.dtype) else None
    if expected_kind == "f" and array.dtype.kind not in "fiu":
        raise InvalidInputError(
            f"array {spec.name!r} has dtype {array.dtype}, the model expects {spec.dtype}", path
        )
    if expected_kind in ("i", "u") and array.dtype.kind not in "iu":
        raise InvalidInputError(
            f"array {spec.name!r} has dtype {array.dtype}, the model expects {spec.dtype}", path
        )
    if spec.shape and array.ndim and (
        array.ndim != len(spec.shape)
        or any(want is not None and want != got
               for position, (want, got) in enumerate(zip(spec.shape, array.shape)) if position != axis)
    ):
        shown = tuple("N" if position == axis else ("?" if d is None else d)
                      for position, d in enumerate(spec.shape))
        raise InvalidInputError(
            f"array {spec.name!r} has shape {array.shape}, the model expects {shown}", path
        )
    converted = array.astype(spec.dtype, copy=False) if expected_kind else array
    _check_finite(path, spec.name, converted)
    return converted


def _known_dtype(name: str) -> bool:
    import numpy as np

    try:
        return np.dtype(name).kind not in "OSUV"
    except TypeError:
        return False


def _check_finite(path: Path, name: str, array: Any) -> None:
    import numpy as np

    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise InvalidInputError(f"array {name!r} holds {bad} NaN or infinite value(s)", path)
