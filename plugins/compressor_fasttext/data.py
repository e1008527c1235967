"""fastText's labelled text format: ``__label__a __label__b some words ...`` per line."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, SupportsIndex, overload

from compressor.errors import InvalidInputError
from compressor.models import Dataset

#: fastText's default label prefix; model files do not record the one used in training.
LABEL_PREFIX = "__label__"
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


def read_labelled_text(path: Path) -> Dataset:
    """Read a fastText training / test file: features are texts, labels lists of labels.

    Blank lines are skipped; a file without any ``__label__`` is refused.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise InvalidInputError(f"line {line} is not UTF-8 text", path) from None
    except OSError as error:
        raise InvalidInputError(f"cannot read the data file ({error.strerror or error})", path) from None
    texts, labels = _parse_lines(text.split("\n"))
    if not texts:
        raise InvalidInputError("the data file is empty", path)
    if not any(labels):
        raise InvalidInputError(
            f"no line carries a {LABEL_PREFIX} label: expected fastText's labelled text "
            f"format ('{LABEL_PREFIX}x some text' per line)",
            path,
        )
    return Dataset(path=path, features=texts, labels=labels, size=len(texts))


def _parse_lines(lines: Iterable[str]) -> tuple[list[str], LabelLists]:
    texts: list[str] = []
    labels = LabelLists()
    for line in lines:
        line_labels, words = split_line(line)
        if line_labels or words:
            texts.append(words)
            labels.append(line_labels)
    return texts, labels
