"""fastText's labelled text format: ``__label__a __label__b some words ...`` per line."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, SupportsIndex, overload

from compressor.plugin import Dataset, InvalidInputError

#: fastText's default label prefix; model files do not record the one used in training.
LABEL_PREFIX = "__label__"
#: The runtime's one input: a line's words (``compressor_fasttext.runtime``).
TEXT_INPUT = "text"
#: The characters fastText splits words on (dictionary.cc readWord).
_SEPARATORS = re.compile("[ \t\r\v\f\0]+")


class LabelLists(list):
    """One list of gold labels per example (a line may carry several).

    Core turns labels into a NumPy array to show them next to changed
    predictions; ragged lists cannot be one, so as an array each line's labels
    are joined by spaces.
    """

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> Any:
        import numpy as np

        return np.array([" ".join(labels) for labels in self], dtype=dtype or str)

    @overload
    def __getitem__(self, index: SupportsIndex) -> list[str]: ...

    @overload
    def __getitem__(self, index: slice) -> LabelLists: ...

    def __getitem__(self, index: SupportsIndex | slice) -> Any:
        item = super().__getitem__(index)
        return LabelLists(item) if isinstance(index, slice) else item


def split_line(line: str) -> tuple[list[str], str]:
    """``"__label__a foo bar"`` -> ``(["__label__a"], "foo bar")``; labels may sit anywhere."""
    labels: list[str] = []
    words: list[str] = []
    for token in _SEPARATORS.split(line):
        if token.startswith(LABEL_PREFIX):
            labels.append(token)
        elif token:
            words.append(token)
    return labels, " ".join(words)


def read_labelled_text(path: Path, limit: int | None = None) -> Dataset:
    """Read a fastText training / test file: the texts (``features["text"]``) and their labels
    (a list of labels per line).

    Reads line by line and stops after ``limit`` examples (``--max-examples``),
    so a large file costs neither time nor memory. Blank lines are skipped; a
    line longer than :data:`MAX_LINE_BYTES` or not UTF-8, and a file without
    any ``__label__``, are refused.
    """
    texts: list[str] = []
    labels = LabelLists()
    try:
        with path.open("rb") as stream:
            lines = _lines(stream, path)
            number = 0
            while limit is None or len(texts) < limit:
                line = next(lines, None)
                if line is None:
                    break
                number += 1
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidInputError(f"line {number} is not UTF-8 text", path) from None
                line_labels, words = split_line(text)
                if line_labels or words:
                    texts.append(words)
                    labels.append(line_labels)
    except OSError as error:
        raise InvalidInputError(f"cannot read the data file ({error.strerror or error})", path) from None
    if not texts:
        raise InvalidInputError("the data file is empty", path)
    if not any(labels):
        raise InvalidInputError(
            f"no line carries a {LABEL_PREFIX} label: expected fastText's labelled text "
            f"format ('{LABEL_PREFIX}x some text' per line)",
            path,
        )
    import numpy as np

    # One input, ``text``, as the runtime declares it: an object array of the lines' words.
    return Dataset(path=path, features={TEXT_INPUT: np.array(texts, dtype=object)}, labels=labels, size=len(texts))


def texts_of(dataset: Dataset) -> list[str]:
    """The lines of text a dataset read by :func:`read_labelled_text` holds."""
    return [str(text) for text in dataset.features[TEXT_INPUT]]


#: The longest line read (about 150,000 words): a whole file on one line is a mistake,
#: and would be held, split and predicted as a single example.
MAX_LINE_BYTES = 1 << 20


def _lines(stream: BinaryIO, path: Path) -> Iterator[bytes]:
    """The lines of ``stream`` without their newline, never reading more than one cap's worth."""
    number = 0
    while line := stream.readline(MAX_LINE_BYTES + 1):
        number += 1
        if line.endswith(b"\n"):
            line = line[:-1]
        if len(line) > MAX_LINE_BYTES:
            raise InvalidInputError(
                f"line {number} is longer than {MAX_LINE_BYTES:,} bytes (one example per line)", path
            )
        yield line
