"""Check a fastText ``.bin`` / ``.ftz`` file against its own size before fastText reads it.

fastText trusts every number in a model file: a truncated dictionary makes it
read until memory runs out, a declared matrix is allocated as declared, and a
row count that does not fit the dictionary crashes on the first prediction.
:func:`read_layout` walks the layout that ``FastText::loadModel`` reads
(``args.cc``, ``dictionary.cc``, ``densematrix.cc``, ``quantmatrix.cc``,
``productquantizer.cc``) without allocating anything it declares, and checks
that every size fits the bytes that are actually there.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from compressor.plugin import InvalidInputError

MAGIC = 793712314
#: 12 is the current format; 11 is still read by fastText (old supervised models).
VERSIONS = (11, 12)
#: Centroids per sub-quantizer (8-bit codes), fixed in productquantizer.h.
KSUB = 256
MODEL_NAMES = {1: "cbow", 2: "skipgram", 3: "supervised"}
LOSS_NAMES = {1: "hs", 2: "ns", 3: "softmax", 4: "ova"}

_ARGS = struct.Struct("<12id")  # dim ws epoch minCount neg wordNgrams loss model bucket minn maxn lrUpdateRate, t
_DICTIONARY = struct.Struct("<iiiqq")  # size nwords nlabels ntokens pruneidx_size
_ENTRY_TAIL = struct.Struct("<qb")  # count, type (after the NUL-terminated word)
_DENSE = struct.Struct("<qq")  # rows, cols
_QUANT = struct.Struct("<?qqi")  # qnorm, rows, cols, codesize
_PQ = struct.Struct("<iiii")  # dim nsubq dsub lastdsub
_FLOAT = 4


@dataclass(frozen=True)
class MatrixLayout:
    """One of the two matrices: dense float32, or product-quantized codes."""

    rows: int
    cols: int
    quantized: bool
    qnorm: bool = False
    dsub: int | None = None


@dataclass(frozen=True)
class ModelLayout:
    """What a fastText model file declares, after checking it against the file."""

    version: int
    model: str
    loss: str
    dim: int
    epoch: int
    word_ngrams: int
    bucket: int
    minn: int
    maxn: int
    words: int
    labels: int
    #: Hashed n-gram rows kept by a quantize cutoff; -1 when not pruned.
    pruned_ngrams: int
    input: MatrixLayout
    output: MatrixLayout
    file_size: int

    @property
    def supervised(self) -> bool:
        return self.model == "supervised"

    @property
    def quantized(self) -> bool:
        return self.input.quantized

    def describe(self) -> dict[str, object]:
        """Facts for the report's metadata."""
        return {
            "model": self.model,
            "loss": self.loss,
            "dim": self.dim,
            "words": self.words,
            "labels": self.labels,
            "bucket": self.bucket,
            "word_ngrams": self.word_ngrams,
            "input_rows": self.input.rows,
            "quantized": self.quantized,
            "quantized_output": self.output.quantized,
            "qnorm": self.input.qnorm,
            "pruned": self.pruned_ngrams >= 0,
        }


class _Cursor:
    """Reads little-endian fields from a buffer, refusing to run past its end."""

    def __init__(self, buffer: mmap.mmap | bytes, path: Path) -> None:
        self.buffer = buffer
        self.size = len(buffer)
        self.offset = 0
        self.path = path

    def error(self, message: str) -> InvalidInputError:
        return InvalidInputError(f"not a valid fastText model: {message}", self.path)

    def need(self, count: int, what: str) -> None:
        if count < 0 or self.offset + count > self.size:
            raise self.error(
                f"{what} needs {count:,} bytes at byte {self.offset:,} but the file has "
                f"{self.size:,} (truncated or corrupt)"
            )

    def read(self, layout: struct.Struct, what: str) -> tuple:
        self.need(layout.size, what)
        values = layout.unpack_from(self.buffer, self.offset)
        self.offset += layout.size
        return values

    def skip(self, count: int, what: str) -> None:
        self.need(count, what)
        self.offset += count

    def flag(self, what: str) -> bool:
        self.need(1, what)
        value = self.buffer[self.offset]
        if value not in (0, 1):
            raise self.error(f"{what} is {value}, not a boolean")
        self.offset += 1
        return bool(value)


def read_layout(path: Path) -> ModelLayout:
    """Parse and check ``path``; raise :class:`InvalidInputError` on any inconsistency."""
    try:
        with path.open("rb") as stream:
            size = path.stat().st_size
            if size == 0:
                raise InvalidInputError("not a valid fastText model: the file is empty", path)
            with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                return _parse(_Cursor(buffer, path))
    except OSError as error:
        raise InvalidInputError(f"cannot read the model ({error.strerror or error})", path) from None


def has_magic(path: Path) -> bool:
    """True when the file starts with fastText's magic number (cheap; for identify)."""
    try:
        with path.open("rb") as stream:
            head = stream.read(4)
    except OSError:
        return False
    return len(head) == 4 and struct.unpack("<i", head)[0] == MAGIC


def _parse(cursor: _Cursor) -> ModelLayout:
    magic, version = cursor.read(struct.Struct("<ii"), "the file header")
    if magic != MAGIC:
        raise cursor.error("wrong magic number (this is not a fastText .bin/.ftz file)")
    if version not in VERSIONS:
        raise cursor.error(f"file format version {version} is not one fastText reads ({VERSIONS})")
    (dim, _ws, epoch, _min_count, _neg, word_ngrams, loss, model, bucket, minn, maxn,
     _lr_update_rate, _t) = cursor.read(_ARGS, "the training arguments")
    if model not in MODEL_NAMES or loss not in LOSS_NAMES:
        raise cursor.error(f"unknown model type {model} or loss {loss}")
    if version == 11 and model == 3:
        maxn = 0  # fastText ignores character n-grams of version-11 classifiers
    if dim <= 0 or bucket < 0:
        raise cursor.error(f"dim {dim} and bucket {bucket} must be positive")
    if bucket == 0 and (maxn > 0 or (model == 3 and word_ngrams > 1)):
        raise cursor.error("bucket is 0 but the model hashes n-grams into buckets")
    words, labels, pruned = _check_dictionary(cursor, model, bucket)
    quantized = cursor.flag("the quantized-input flag")
    if not quantized and pruned >= 0:
        raise cursor.error("the dictionary is pruned but the input matrix is not quantized")
    input_rows = words + (pruned if pruned >= 0 else bucket)
    input_matrix = _matrix(cursor, quantized, "input matrix", input_rows, dim)
    quantized_output = cursor.flag("the quantized-output flag")
    output_rows = labels if model == 3 else words
    output_matrix = _matrix(cursor, quantized and quantized_output, "output matrix", output_rows, dim)
    if cursor.offset != cursor.size:
        raise cursor.error(
            f"{cursor.size - cursor.offset:,} unexpected bytes after the output matrix"
        )
    return ModelLayout(
        version=version, model=MODEL_NAMES[model], loss=LOSS_NAMES[loss], dim=dim, epoch=epoch,
        word_ngrams=word_ngrams, bucket=bucket, minn=minn, maxn=maxn, words=words,
        labels=labels, pruned_ngrams=pruned, input=input_matrix, output=output_matrix,
        file_size=cursor.size,
    )


def _check_dictionary(cursor: _Cursor, model: int, bucket: int) -> tuple[int, int, int]:
    size, words, labels, _tokens, pruned = cursor.read(_DICTIONARY, "the dictionary header")
    if min(size, words, labels) < 0 or words + labels != size:
        raise cursor.error(f"dictionary counts do not add up ({words} words + {labels} labels != {size})")
    if model == 3 and labels == 0:
        raise cursor.error("a supervised model without labels")
    # The smallest entry is an empty word: its NUL, an int64 count and a type byte.
    cursor.need(size * (1 + _ENTRY_TAIL.size), f"a dictionary of {size:,} entries")
    # A plain loop: this runs once per vocabulary word, so it avoids per-entry helpers.
    buffer, offset, find, unpack = cursor.buffer, cursor.offset, cursor.buffer.find, _ENTRY_TAIL.unpack_from
    last_start = cursor.size - _ENTRY_TAIL.size
    for index in range(size):
        end = find(b"\0", offset)
        if end < 0 or end + 1 > last_start:
            raise cursor.error(f"dictionary entry {index} of {size:,} runs past the end (truncated)")
        count, kind = unpack(buffer, end + 1)
        offset = end + 1 + _ENTRY_TAIL.size
        if kind != (index >= words) or count < 1:
            raise cursor.error(f"dictionary entry {index} is corrupt (type {kind}, count {count})")
    cursor.offset = offset
    if pruned < -1:
        raise cursor.error(f"pruned index size {pruned} is negative")
    if pruned > 0:
        _check_prune_index(cursor, pruned, bucket)
    return words, labels, pruned


def _check_prune_index(cursor: _Cursor, pruned: int, bucket: int) -> None:
    import numpy as np

    length = pruned * 8
    cursor.need(length, f"a pruned index of {pruned:,} pairs")
    pairs = np.frombuffer(
        bytes(cursor.buffer[cursor.offset : cursor.offset + length]), dtype="<i4"
    ).reshape(-1, 2)
    cursor.offset += length
    buckets, rows = pairs[:, 0], pairs[:, 1]
    if buckets.min() < 0 or buckets.max() >= bucket or rows.min() < 0 or rows.max() >= pruned:
        raise cursor.error("the pruned index points outside the n-gram buckets or rows")


def _matrix(cursor: _Cursor, quantized: bool, what: str, rows: int, cols: int) -> MatrixLayout:
    if not quantized:
        declared_rows, declared_cols = cursor.read(_DENSE, f"the {what} shape")
        _check_shape(cursor, what, (declared_rows, declared_cols), (rows, cols))
        cursor.skip(declared_rows * declared_cols * _FLOAT, f"the {what} ({rows:,} x {cols:,})")
        return MatrixLayout(rows, cols, quantized=False)
    qnorm, declared_rows, declared_cols, code_size = cursor.read(_QUANT, f"the quantized {what} header")
    _check_shape(cursor, what, (declared_rows, declared_cols), (rows, cols))
    cursor.skip(code_size, f"the {what} codes")
    dsub = _product_quantizer(cursor, what, cols, rows, code_size)
    if qnorm:
        cursor.skip(rows, f"the {what} norm codes")
        _product_quantizer(cursor, f"{what} norms", 1, rows, rows)
    return MatrixLayout(rows, cols, quantized=True, qnorm=bool(qnorm), dsub=dsub)


def _check_shape(cursor: _Cursor, what: str, declared: tuple[int, int], expected: tuple[int, int]) -> None:
    if declared != expected:
        raise cursor.error(
            f"the {what} is declared {declared[0]:,} x {declared[1]:,} but the dictionary and "
            f"arguments need {expected[0]:,} x {expected[1]:,}"
        )


def _product_quantizer(cursor: _Cursor, what: str, dim: int, rows: int, code_size: int) -> int:
    pq_dim, subquantizers, dsub, last_dsub = cursor.read(_PQ, f"the {what} quantizer")
    if pq_dim != dim or dsub < 1:
        raise cursor.error(f"the {what} quantizer has dim {pq_dim} / dsub {dsub}, expected dim {dim}")
    expected_last = dim % dsub or dsub
    expected_subquantizers = -(-dim // dsub)
    if (subquantizers, last_dsub) != (expected_subquantizers, expected_last):
        raise cursor.error(f"the {what} quantizer's sub-vector sizes are inconsistent")
    if code_size != rows * subquantizers:
        raise cursor.error(
            f"the {what} has {code_size:,} codes, expected {rows * subquantizers:,}"
        )
    cursor.skip(dim * KSUB * _FLOAT, f"the {what} centroids")
    return dsub
