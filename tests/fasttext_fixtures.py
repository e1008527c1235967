"""Small real fastText models for the fasttext backend's tests, trained once per session.

The test modules load this as a plugin (``pytest_plugins``) after importing its
helpers, and it holds no asserts: PYTEST_DONT_REWRITE.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from compressor_fasttext.samples import TRAIN_THREADS, train_supervised, write_labelled_text

#: Byte offsets in a fastText file (see compressor_fasttext.header).
ARGS_OFFSET = 8
BUCKET_OFFSET = ARGS_OFFSET + 8 * 4
DICTIONARY_OFFSET = ARGS_OFFSET + 56


@dataclass(frozen=True)
class FastTextFiles:
    folder: Path
    train: Path
    test: Path
    #: Supervised, 6 labels, 4000 hashed bigram rows, dim 16.
    model: Path
    #: The same model quantized by fastText itself (cutoff 1000, retrain, qnorm).
    quantized: Path
    #: Supervised with fewer than 256 input rows (no buckets, small vocabulary).
    tiny: Path
    #: Supervised with 300 labels, for quantizing the output matrix.
    many_labels: Path
    #: A cbow word-vector model (with character n-grams).
    vectors: Path


@pytest.fixture(scope="session")
def ft(tmp_path_factory: pytest.TempPathFactory) -> FastTextFiles:
    import fasttext

    folder = tmp_path_factory.mktemp("fasttext")
    train, test = folder / "train.txt", folder / "test.txt"
    write_labelled_text(train, 3000, seed=1)
    write_labelled_text(test, 400, seed=2)
    model = train_supervised(train, folder / "model.bin")

    quantized = folder / "model.ftz"
    handle = fasttext.load_model(str(model))
    handle.quantize(input=str(train), cutoff=1000, retrain=True, qnorm=True, thread=1)
    handle.save_model(str(quantized))

    tiny_train = folder / "tiny.txt"
    write_labelled_text(tiny_train, 300, seed=3, vocabulary=5, shared_vocabulary=20)
    tiny = folder / "tiny.bin"
    fasttext.train_supervised(str(tiny_train), dim=8, epoch=2, verbose=0, thread=TRAIN_THREADS).save_model(str(tiny))

    many_train = folder / "many.txt"
    topics = [f"t{i:03d}" for i in range(300)]
    write_labelled_text(many_train, 3000, seed=4, topics=topics, vocabulary=2, shared_vocabulary=20)
    many_labels = folder / "many.bin"
    fasttext.train_supervised(
        str(many_train), dim=8, epoch=2, verbose=0, thread=TRAIN_THREADS, wordNgrams=2, bucket=2000
    ).save_model(str(many_labels))

    vectors = folder / "vectors.bin"
    fasttext.train_unsupervised(
        str(train), model="cbow", dim=8, epoch=1, minCount=1, minn=2, maxn=3,
        bucket=1000, verbose=0, thread=TRAIN_THREADS,
    ).save_model(str(vectors))
    return FastTextFiles(folder, train, test, model, quantized, tiny, many_labels, vectors)


def patched(source: Path, destination: Path, offset: int, fmt: str, *values: int) -> Path:
    """A copy of ``source`` with ``values`` packed at ``offset``."""
    data = bytearray(source.read_bytes())
    struct.pack_into(fmt, data, offset, *values)
    destination.write_bytes(bytes(data))
    return destination


def input_matrix_offset(path: Path) -> int:
    """Where the input matrix's (rows, cols) start in an unquantized model."""
    data = path.read_bytes()
    size = struct.unpack_from("<i", data, DICTIONARY_OFFSET)[0]
    offset = DICTIONARY_OFFSET + 28
    for _ in range(size):
        offset = data.index(b"\0", offset) + 1 + 9
    return offset + 1  # the quantized-input flag
