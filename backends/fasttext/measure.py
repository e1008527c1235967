"""Measure a saved fastText model: load time, latency, and fastText's own test metrics."""

from __future__ import annotations

import itertools
from typing import Any

from compressor.errors import InvalidInputError
from compressor.measuring import Stopwatch, time_calls
from compressor.models import Artifact, Dataset, Measurement, MeasureSettings
from compressor_fasttext.header import read_layout
from compressor_fasttext.loading import fasttext_module
from compressor_fasttext.metrics import evaluate

#: Latency is timed on this text when no evaluation data is given.
FALLBACK_TEXT = "the quick brown fox jumps over the lazy dog"


def measure_artifact(artifact: Artifact, data: Dataset | None, settings: MeasureSettings) -> Measurement:
    with Stopwatch() as check:
        layout = read_layout(artifact.path)
    fasttext = fasttext_module()

    with Stopwatch() as load:
        model = fasttext.load_model(str(artifact.path))
    metrics: dict[str, Any] = {"load_ms": load.ms, "header_check_ms": check.ms}
    texts = list(data.features[: settings.max_examples]) if data is not None else []
    samples = texts or [FALLBACK_TEXT]
    if not layout.supervised:
        return _measure_vectors(model, samples, bool(texts), metrics, settings)
    k = int(settings.options.get("k") or 1)
    following = itertools.cycle(samples)
    metrics["latency_ms"] = time_calls(lambda: model.predict(next(following), k=1), settings)
    batch = list(itertools.islice(itertools.cycle(samples), settings.batch_size))
    metrics["batch_latency_ms"] = time_calls(
        lambda: model.predict(batch, k=1), settings, items_per_call=len(batch)
    )
    if data is None:
        return Measurement(metrics=metrics)
    try:
        ranked, _ = model.predict(texts, k=max(k, 1))
    except (TypeError, ValueError, RuntimeError) as error:
        # pybind11's TypeError repeats every argument: the whole eval text. Name the kind only.
        raise InvalidInputError(
            f"fastText could not predict on it with k={k} ({type(error).__name__})", data.path
        ) from None
    predicted = [list(line) for line in ranked]
    gold = data.labels[: len(texts)] if data.labels is not None else [[] for _ in texts]
    scores = evaluate(predicted, gold, set(model.labels), k)
    metrics.update(scores)
    metrics.setdefault("accuracy", None)
    predictions = [line[0] if line else "" for line in predicted]
    return Measurement(metrics=metrics, predictions=predictions)


def _measure_vectors(
    model: Any, samples: list[str], have_data: bool, metrics: dict[str, Any], settings: MeasureSettings
) -> Measurement:
    """Word-vector models predict nothing: time sentence vectors, compare them by cosine."""
    import numpy as np

    following = itertools.cycle(samples)
    metrics["latency_ms"] = time_calls(lambda: model.get_sentence_vector(next(following)), settings)
    outputs = np.stack([model.get_sentence_vector(text) for text in samples]) if have_data else None
    return Measurement(metrics=metrics, outputs=outputs)
