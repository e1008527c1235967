"""Core's own plugins: the ``.npz`` data reader and the file-size measurers.

They register no backend, so they take part for every backend.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from compressor.hookspecs import hookimpl
from compressor.models import Artifact, Dataset, Measurement, MeasureSettings, TensorSpec
from compressor.npz import read_npz

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
