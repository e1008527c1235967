"""Core's own plugins: the ``.npz`` data reader and the file-size measurers.

They register no backend, so they take part for every backend.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

from compressor.errors import InvalidInputError
from compressor.hookspecs import hookimpl
from compressor.models import Artifact, Dataset, Measurement, MeasureSettings, TensorSpec

_CHUNK = 1 << 20


def gzip_size(path: Path) -> int:
    """Bytes after gzip's default deflate level, streamed so large models fit in RAM."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    total = 0
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            total += len(compressor.compress(chunk))
    return total + len(compressor.flush())


@hookimpl
def compressor_measure(
    artifact: Artifact, data: Dataset | None, settings: MeasureSettings
) -> Measurement:
    files = [path for path in artifact.files if path.is_file()]
    return Measurement(
        metrics={
            "size_bytes": sum(path.stat().st_size for path in files),
            "size_gzip_bytes": sum(gzip_size(path) for path in files),
        }
    )


@hookimpl(trylast=True)
def compressor_load_data(
    path: Path, purpose: str, inputs: tuple[TensorSpec, ...], backend: str, limit: int | None = None
) -> Dataset | None:
    if path.suffix != ".npz":
        return None
    return read_npz(path, inputs, limit)


def read_npz(path: Path, inputs: tuple[TensorSpec, ...], limit: int | None = None) -> Dataset:
    """Read an ``.npz`` with one array per input (or ``x``) and labels in ``y``,
    checking names, dtypes, shapes, lengths and finiteness against ``inputs``;
    only the first ``limit`` examples are read. An optional input the file
    lacks is left out, with a note (the model then uses its default)."""
    from compressor.npz import read_arrays

    arrays = read_arrays(path, limit)
    labels = arrays.pop("y", None)
    specs = inputs or (TensorSpec("x", (), "float32"),)
    features: dict[str, Any] = {}
    notes = []
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
        features[spec.name] = _check_array(path, spec, array, bool(inputs))
    sizes = {len(array) for array in features.values()}
    if len(sizes) != 1:
        raise InvalidInputError(f"inputs have different numbers of examples: {sorted(sizes)}", path)
    size = sizes.pop()
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


def _check_array(path: Path, spec: TensorSpec, array: Any, strict: bool) -> Any:
    import numpy as np

    if array.ndim == 0:
        raise InvalidInputError(f"array {spec.name!r} is a scalar, expected a batch", path)
    if not strict:
        _check_finite(path, spec.name, array)
        return array
    expected_kind = np.dtype(spec.dtype).kind
    if expected_kind == "f" and array.dtype.kind not in "fiu":
        raise InvalidInputError(
            f"array {spec.name!r} has dtype {array.dtype}, the model expects {spec.dtype}", path
        )
    if expected_kind in "iu" and array.dtype.kind not in "iu":
        raise InvalidInputError(
            f"array {spec.name!r} has dtype {array.dtype}, the model expects {spec.dtype}", path
        )
    if spec.shape and (
        array.ndim != len(spec.shape)
        or any(want is not None and want != got for want, got in zip(spec.shape[1:], array.shape[1:]))
    ):
        shown = tuple("N" if d is None else d for d in spec.shape)
        raise InvalidInputError(
            f"array {spec.name!r} has shape {array.shape}, the model expects {shown}", path
        )
    converted = array.astype(spec.dtype, copy=False)
    _check_finite(path, spec.name, converted)
    return converted


def _check_finite(path: Path, name: str, array: Any) -> None:
    import numpy as np

    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise InvalidInputError(f"array {name!r} holds {bad} NaN or infinite value(s)", path)
