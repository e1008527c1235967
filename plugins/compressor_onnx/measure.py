"""Measure a saved ONNX model through ONNX Runtime with a fixed thread count.

What the model outputs decides what is compared with the original:

* classifier (``[batch, classes]``): ``predictions`` are the top-1 classes,
  ``outputs`` the logits;
* transformer encoder (``[batch, sequence, hidden]`` plus an ``attention_mask``
  input): ``outputs`` are attention-mask mean-pooled sentence embeddings, and
  ``predictions`` the index of each sentence's nearest neighbour (cosine) among
  the evaluation sentences, so core's ``agreement`` is nearest-neighbour
  agreement; with labels, ``accuracy`` is leave-one-out 1-NN accuracy;
* anything else: ``outputs`` are the flattened outputs (regression, embeddings).
"""

from __future__ import annotations

from typing import Any

from compressor import (
    Artifact,
    Dataset,
    InvalidInputError,
    Measurement,
    MeasureSettings,
    Stopwatch,
    time_calls,
)
from compressor_onnx.shapes import SampleShape, parse_input_shape, synthetic_inputs

#: Sequence length of synthetic token inputs when no data or input_shape says otherwise.
SYNTHETIC_SEQUENCE = 128


def open_session(artifact: Artifact, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(artifact.path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - ORT raises its own exception types
        raise InvalidInputError(f"ONNX Runtime cannot load this model ({error})", artifact.path) from None


def measure_artifact(artifact: Artifact, data: Dataset | None, settings: MeasureSettings) -> Measurement:
    with Stopwatch() as load:
        session = open_session(artifact, settings.threads)
    feeds = _data_feeds(session, data, settings) if data is not None else _synthetic_feeds(session, settings)
    rows = len(next(iter(feeds.values())))
    fixed_batch = _fixed_batch(session)
    single = {name: _take(array, fixed_batch or 1) for name, array in feeds.items()}
    metrics: dict[str, Any] = {
        "load_ms": load.ms,
        "latency_ms": time_calls(lambda: session.run(None, single), settings, fixed_batch or 1),
        "threads": settings.threads,
    }
    if fixed_batch is None:
        batch_size = max(1, settings.batch_size)
        batch = {name: _take(array, batch_size) for name, array in feeds.items()}
        metrics["latency_batch_ms"] = time_calls(lambda: session.run(None, batch), settings, batch_size)
        metrics["batch_size"] = batch_size
    else:
        # The graph takes only this batch: it is timed as is and evaluated in padded batches of it.
        batch_size = metrics["fixed_batch"] = fixed_batch
    if data is not None:
        output = _run_batches(session, feeds, rows, batch_size, pad=fixed_batch is not None)
        measurement = _interpret(output, feeds, data, metrics, rows)
    else:
        measurement = Measurement(metrics=metrics)
    return measurement


def _interpret(
    output: Any, feeds: dict[str, Any], data: Dataset, metrics: dict[str, Any], rows: int
) -> Measurement:
    import numpy as np

    if output.ndim == 3:
        embeddings = mean_pool(output, feeds.get("attention_mask"))
        metrics["output_kind"] = "sentence_embedding"
        neighbours = nearest_neighbours(embeddings) if rows > 1 else None
        if neighbours is not None and data.labels is not None:
            labels = np.asarray(data.labels[:rows])
            metrics["accuracy"] = float(np.mean(labels[neighbours] == labels))
        return Measurement(metrics=metrics, predictions=neighbours, outputs=embeddings)
    if output.ndim == 2 and output.shape[1] > 1:
        metrics["output_kind"] = "classifier"
        return Measurement(metrics=metrics, predictions=output.argmax(1), outputs=output)
    metrics["output_kind"] = "regression"
    return Measurement(metrics=metrics, outputs=output.reshape(rows, -1))


def mean_pool(hidden: Any, attention_mask: Any | None) -> Any:
    """Average the token vectors of each sequence, counting only unmasked tokens."""
    import numpy as np

    if attention_mask is None:
        return hidden.mean(axis=1)
    mask = attention_mask[..., None].astype(np.float32)
    return (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)


def nearest_neighbours(embeddings: Any) -> Any:
    """For each row, the index of its most cosine-similar other row."""
    import numpy as np

    unit = embeddings / np.clip(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12, None)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def _run_batches(session: Any, feeds: dict[str, Any], rows: int, batch_size: int, pad: bool) -> Any:
    """The first output for every row; with ``pad`` the last batch is filled up to ``batch_size``."""
    import numpy as np

    pieces = []
    for start in range(0, rows, batch_size):
        chunk = {name: array[start : start + batch_size] for name, array in feeds.items()}
        count = len(next(iter(chunk.values())))
        if pad and count < batch_size:
            chunk = {name: _take(array, batch_size) for name, array in chunk.items()}
        pieces.append(session.run(None, chunk)[0][:count])
    return np.concatenate(pieces).astype(np.float32)


def _fixed_batch(session: Any) -> int | None:
    """The batch size a graph with a fixed first input dimension accepts, else None."""
    fixed = [spec.shape[0] for spec in session.get_inputs() if spec.shape and isinstance(spec.shape[0], int)]
    return fixed[0] if fixed else None


def _take(array: Any, count: int) -> Any:
    """``count`` rows, repeating the available ones when there are fewer."""
    import numpy as np

    if len(array) >= count:
        return array[:count]
    return np.resize(array, (count, *array.shape[1:]))


def _data_feeds(session: Any, data: Dataset, settings: MeasureSettings) -> dict[str, Any]:
    import numpy as np

    features = data.features
    inputs = session.get_inputs()
    if len(inputs) == 1 and inputs[0].name not in features and len(features) == 1:
        features = {inputs[0].name: next(iter(features.values()))}
    missing = [spec.name for spec in inputs if spec.name not in features]
    if missing:
        raise InvalidInputError(f"has no array for the model input(s) {', '.join(missing)}", data.path)
    limit = settings.max_examples or data.size
    return {
        spec.name: np.ascontiguousarray(features[spec.name][:limit]).astype(_numpy_type(spec.type))
        for spec in inputs
    }


def _synthetic_feeds(session: Any, settings: MeasureSettings) -> dict[str, Any]:
    declared = settings.options.get("input_shape")
    if declared:
        return synthetic_inputs(parse_input_shape(str(declared)))
    shapes = []
    for spec in session.get_inputs():
        dtype = _numpy_type(spec.type)
        dims = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                dims.append(dim)
            else:
                dims.append(1 if axis == 0 else SYNTHETIC_SEQUENCE)
        shapes.append(SampleShape(spec.name, tuple(dims), dtype))
    return synthetic_inputs(tuple(shapes))


def _numpy_type(onnx_type: str) -> str:
    """``tensor(float)`` -> ``float32``."""
    name = onnx_type.removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64", "float16": "float16"}.get(name, name)
