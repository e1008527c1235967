"""Check a Keras HDF5 file (``.h5``, or the weights inside a ``.keras``) before Keras reads it.

Three HDF5 features make a reader open *other* files: external storage (a
dataset's bytes live in a named file at an offset), external links (a link to
an object in another HDF5 file) and virtual datasets (a dataset mapped onto
datasets in other files). HDF5 resolves their relative names against the
current working directory or the ``HDF5_EXTFILE_PREFIX``, ``HDF5_EXT_PREFIX``
and ``HDF5_VDS_PREFIX`` variables, not against the model's folder, so no name
can be proven to stay inside it; Keras never writes any of them. All are
refused (exit 3), which keeps any file on disk out of the converted model.

Datasets whose filters HDF5 would load from a plugin library are refused unless
``--trust``, and datasets that inflate far beyond the bytes they store (a
compressed or never-written dataset of zeros) are refused as corrupt (exit 4).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from compressor.plugin import InvalidInputError, UnsafeInputError, first_line

#: Filters HDF5 and h5py carry themselves: deflate, shuffle, fletcher32, szip,
#: nbit, scale-offset, LZF. Any other is dlopen()ed from HDF5_PLUGIN_PATH.
BUILTIN_FILTERS = frozenset({1, 2, 3, 4, 5, 6, 32000})
#: A dataset may read as this many times its stored bytes before it is refused...
MAX_INFLATION = 100
#: ...once it reads as more than this (small datasets of zeros are common).
INFLATION_FLOOR = 64 << 20
#: The largest ``model_config`` attribute read (real configs are a few MB).
CONFIG_LIMIT = 64 << 20
_NAME_SHOWN = 120


def inspect(
    source: Path | IO[bytes], path: Path, trust: bool, what: str = "", config: bool = False
) -> Any:
    """Walk every link and dataset of the HDF5 file ``source`` (a path or a seekable
    binary stream); refuse what would read other files. Return the parsed
    ``model_config`` attribute when ``config`` (None when the file has none).

    ``path`` is the file named in errors; ``what`` names the archive member
    (``"model.weights.h5"``) when ``source`` is one.
    """
    import h5py

    where = f"{what}: " if what else ""
    try:
        with h5py.File(source, "r") as file:
            _walk(file, path, trust, where)
            return _model_config(file, path) if config else None
    except (InvalidInputError, UnsafeInputError):
        raise
    except Exception as error:  # noqa: BLE001 - h5py raises OSError, KeyError, TypeError... on bad bytes
        damaged = f"{what} is" if what else "is"
        raise InvalidInputError(f"{damaged} a damaged HDF5 file ({first_line(error)})", path) from None


def _walk(file: Any, path: Path, trust: bool, where: str) -> None:
    import h5py
    from h5py import h5l

    links = file.id.links
    raw_names: list[bytes] = []
    # Visit every link (hard, soft, external, user-defined) once; groups reached
    # through hard links are descended, so every object Keras can name is seen.
    links.visit(raw_names.append)
    for raw in raw_names:
        name = raw.decode("utf-8", "replace")
        kind = links.get_info(raw).type
        if kind == h5l.TYPE_EXTERNAL:
            target = file.get(raw, getlink=True)
            raise UnsafeInputError(
                f"{where}links {_shown('/' + name)} to {_shown(target.path)} in another file "
                f"({_shown(target.filename)}, an HDF5 external link); refused: {_WHY}",
                path,
            )
        if kind == h5l.TYPE_SOFT:
            continue
        if kind != h5l.TYPE_HARD:
            raise UnsafeInputError(
                f"{where}has a user-defined HDF5 link {_shown('/' + name)} (type {kind}); refused",
                path,
            )
        node = file[raw]
        if isinstance(node, h5py.Dataset):
            _check_dataset(node, "/" + name, path, trust, where)


_WHY = "Keras never writes one, and HDF5 would read that file from anywhere on disk"


def _check_dataset(dataset: Any, name: str, path: Path, trust: bool, where: str) -> None:
    shown = _shown(name)
    external = dataset.external
    if external:
        files = ", ".join(_shown(str(entry[0])) for entry in external[:3])
        raise UnsafeInputError(
            f"{where}dataset {shown} keeps its data in another file ({files}, HDF5 external "
            f"storage); refused: {_WHY}",
            path,
        )
    if dataset.is_virtual:
        raise UnsafeInputError(
            f"{where}dataset {shown} is an HDF5 virtual dataset, mapped onto datasets in "
            f"other files; refused: {_WHY}",
            path,
        )
    plist = dataset.id.get_create_plist()
    filters = [plist.get_filter(index)[0] for index in range(plist.get_nfilters())]
    foreign = [code for code in filters if code not in BUILTIN_FILTERS]
    if foreign and not trust:
        raise UnsafeInputError(
            f"{where}dataset {shown} needs HDF5 filter {foreign[0]}, which HDF5 loads from a "
            "plugin library (code); pass --trust only if you trust where the file came from",
            path,
        )
    logical = dataset.id.get_type().get_size() * _count(dataset.shape)
    stored = dataset.id.get_storage_size()
    if logical > INFLATION_FLOOR and logical > MAX_INFLATION * stored:
        raise InvalidInputError(
            f"{where}dataset {shown} reads as {logical:,} bytes from {stored:,} stored "
            f"(more than {MAX_INFLATION}x: a decompression bomb or corrupt)",
            path,
        )


def _count(shape: tuple[int, ...] | None) -> int:
    total = 1
    for size in shape or ():
        total *= int(size)
    return total


def _model_config(file: Any, path: Path) -> Any:
    if "model_config" not in file.attrs:
        return None
    # Attributes are never compressed: reading one reads at most the file's own bytes.
    raw = file.attrs["model_config"]
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    if len(text) > CONFIG_LIMIT:
        raise InvalidInputError(f"its model_config is {len(text):,} bytes, over the {CONFIG_LIMIT:,} read", path)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise InvalidInputError(f"has an unreadable model_config ({first_line(error)})", path) from None


def _shown(name: str) -> str:
    """A name from the file, quoted, on one line, not too long."""
    text = repr(name)
    return text if len(text) <= _NAME_SHOWN else text[: _NAME_SHOWN - 4] + "...'"
