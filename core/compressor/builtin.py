"""Core's own plugin, the ``.npz`` data reader (it registers no backend, so it takes part
for every backend), and the file sizes every measurement has (:func:`size_metrics`).

The gzip size is gzip's default level (6). Files up to
:data:`GZIP_EXACT_MAX_BYTES` are compressed whole (``size_gzip_method: exact``);
larger ones, where that takes minutes (10 MB/s on fp32 weights), are estimated
from :data:`GZIP_SAMPLE_CHUNKS` chunks spread over the whole file
(``size_gzip_method: sampled``, :func:`gzip_size_sampled`).
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path
from typing import Any

from compressor.hookspecs import hookimpl
from compressor.models import Artifact, Dataset, TensorSpec
from compressor.npz import read_npz

_CHUNK = 1 << 20
#: gzip's default deflate level, the one ``size_gzip_bytes`` stands for.
GZIP_LEVEL = 6
#: Files up to this size get the exact gzip size; larger ones a sampled estimate.
GZIP_EXACT_MAX_BYTES = 128 << 20
#: The estimate compresses this many chunks, one at a random place in each of as many
#: equal slices of the file (stratified: every part of the file is represented).
GZIP_SAMPLE_CHUNKS = 64
GZIP_SAMPLE_CHUNK_BYTES = 1 << 20
#: deflate looks back at most 32 KiB: each chunk is compressed with the 32 KiB before it
#: as its dictionary, so it compresses as it would inside the whole stream.
_DEFLATE_WINDOW = 32 << 10
#: A gzip member's header (10 bytes, no name) and trailer (CRC-32 and length).
_GZIP_FRAMING = 18


def gzip_size(path: Path) -> int:
    """Bytes after gzip's default deflate level, streamed so large models fit in RAM."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    total = 0
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            total += len(compressor.compress(chunk))
    return total + len(compressor.flush())


def gzip_size_sampled(path: Path, chunks: int = GZIP_SAMPLE_CHUNKS,
                      chunk_bytes: int = GZIP_SAMPLE_CHUNK_BYTES) -> int:
    """An estimate of :func:`gzip_size` from ``chunks`` chunks of ``chunk_bytes``.

    The file is cut into ``chunks`` equal slices and one chunk is compressed from a
    place in each (pseudo-random, seeded by the file's size, so the same file gets
    the same figure): even spacing could fall in step with a model's repeating
    layers, and the compressibility of a pruned model changes along the file. The
    estimate is the compressed share of the sampled bytes times the file's size.
    A file no larger than the sample is compressed whole."""
    size = path.stat().st_size
    if size <= chunks * chunk_bytes:
        return gzip_size(path)
    pick = random.Random(size)
    slice_bytes = size / chunks
    sampled = compressed = 0
    with path.open("rb") as stream:
        for index in range(chunks):
            low = int(index * slice_bytes)
            start = pick.randint(low, max(low, int((index + 1) * slice_bytes) - chunk_bytes))
            history_start = max(0, start - _DEFLATE_WINDOW)
            stream.seek(history_start)
            history = stream.read(start - history_start)
            data = stream.read(chunk_bytes)
            compressor = (zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15, zdict=history) if history
                          else zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15))
            compressed += len(compressor.compress(data)) + len(compressor.flush())
            sampled += len(data)
    return round(compressed * size / sampled) + _GZIP_FRAMING


def gzip_size_of(path: Path) -> tuple[int, str]:
    """``(bytes, method)``: exact up to :data:`GZIP_EXACT_MAX_BYTES`, else sampled."""
    if path.stat().st_size <= GZIP_EXACT_MAX_BYTES:
        return gzip_size(path), "exact"
    return gzip_size_sampled(path, GZIP_SAMPLE_CHUNKS, GZIP_SAMPLE_CHUNK_BYTES), "sampled"


def size_metrics(artifact: Artifact) -> dict[str, Any]:
    """``size_bytes``, ``size_gzip_bytes`` and ``size_gzip_method`` of every file of ``artifact``
    (the measuring process adds them to every backend's measurement)."""
    # A folder artifact (a SavedModel, onnxruntime-genai's model folder) counts every file inside.
    files = artifact.plain_files()
    gzipped = [gzip_size_of(path) for path in files]
    return {
        "size_bytes": sum(path.stat().st_size for path in files),
        "size_gzip_bytes": sum(size for size, _ in gzipped),
        "size_gzip_method": "sampled" if any(method == "sampled" for _, method in gzipped) else "exact",
    }


@hookimpl(trylast=True)
def compressor_load_data(
    path: Path, purpose: str, inputs: tuple[TensorSpec, ...], backend: str, limit: int | None
) -> Dataset | None:
    # No default on ``limit``: pluggy passes only arguments without one.
    if path.suffix != ".npz":
        return None
    return read_npz(path, inputs, limit)
