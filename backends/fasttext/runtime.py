"""A saved fastText model opened for core to measure (``compressor_open_runtime``).

Core feeds it lines of text (input ``text``, dtype ``str``) and times it like every
backend. A classifier returns each line's top label (output ``label``: strings such
as ``__label__games``, ``""`` when it predicts none), which core compares with the
original's as a classifier's top-1 (agreement, confusion, the changed lines); its
own figures on the labelled data, computed the way ``fasttext test`` computes them
(precision@1 as ``accuracy``, precision and recall at ``--set k=``, F1 per label),
come from :meth:`FastTextRuntime.evaluate`. A word-vector model returns each line's
sentence vector (output ``sentence_vector``), compared as an embedding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from compressor.plugin import (
    Artifact,
    Dataset,
    InvalidInputError,
    MeasureSettings,
    Runtime,
    Stopwatch,
    TensorSpec,
)
from compressor_fasttext.data import TEXT_INPUT, texts_of
from compressor_fasttext.header import read_layout
from compressor_fasttext.loading import fasttext_module
from compressor_fasttext.metrics import evaluate


class FastTextRuntime(Runtime):
    """``fasttext.load_model`` of an artifact whose layout checked out first."""

    def __init__(self, artifact: Artifact, settings: MeasureSettings) -> None:
        with Stopwatch() as check:
            self.layout = read_layout(artifact.path)
        self.header_check_ms = check.ms
        self.model = fasttext_module().load_model(str(artifact.path))
        self.k = int(settings.options.get("k") or 1)
        self.max_examples = settings.max_examples
        self.inputs = (TensorSpec(TEXT_INPUT, (None,), "str"),)
        if self.layout.supervised:
            self.outputs = (TensorSpec("label", (None,), "str"),)
        else:
            self.outputs = (TensorSpec("sentence_vector", (None, self.layout.dim), "float32"),)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        import numpy as np

        lines = [str(text) for text in feeds[TEXT_INPUT]]
        if not self.layout.supervised:
            vectors = [self.model.get_sentence_vector(line) for line in lines]
            return {"sentence_vector": np.asarray(vectors, dtype=np.float32).reshape(len(lines), self.layout.dim)}
        # Predicted at the report's k, as fastText ranks them: the top label is that ranking's first.
        ranked = self._predict(lines, max(self.k, 1))
        return {"label": np.asarray([labels[0] if labels else "" for labels in ranked], dtype=str)}

    def metrics(self) -> dict[str, Any]:
        return {"header_check_ms": self.header_check_ms}

    def evaluate(self, data: Dataset) -> dict[str, Any]:
        """Precision@1 (as ``accuracy``), precision@k, recall@k and F1 per label at k, as
        ``model.test(path, k)`` and ``test_label`` compute them."""
        if not self.layout.supervised:
            return {}
        texts = texts_of(data)[: self.max_examples]
        predicted = [list(line) for line in self._predict(texts, max(self.k, 1), data)]
        gold = data.labels[: len(texts)] if data.labels is not None else [[] for _ in texts]
        scores = evaluate(predicted, gold, set(self.model.labels), self.k)
        scores.setdefault("accuracy", None)
        return scores

    def _predict(self, lines: Sequence[str], k: int, data: Dataset | None = None) -> list[Any]:
        try:
            ranked, _ = self.model.predict(list(lines), k=k)
        except (TypeError, ValueError, RuntimeError) as error:
            # pybind11's TypeError repeats every argument: the whole eval text. Name the kind only.
            raise InvalidInputError(
                f"fastText could not predict on it with k={k} ({type(error).__name__})",
                data.path if data is not None else None,
            ) from error
        return list(ranked)
