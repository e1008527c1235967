"""The ``pq`` step: fastText's own product quantization, checked before fastText runs it.

fastText exits or crashes instead of raising for several requests it cannot
serve (a quantized or too small matrix, an unsupervised model), so each is
refused here first with a message that says what to change.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from compressor.plugin import (
    CompressionError,
    Context,
    Dataset,
    Model,
    Param,
    Step,
    Stopwatch,
    Technique,
    UnsupportedError,
    UsageError,
    first_line,
)
from compressor_fasttext.data import texts_of
from compressor_fasttext.header import KSUB
from compressor_fasttext.loading import FastTextModel
from compressor_fasttext.metrics import labels_changed_most

#: fastText keeps counts in 32-bit ints and starts one thread per ``thread``; past these
#: maxima it overflows (an internal error) or cannot start its threads (the process aborts).
INT32_MAX = 2**31 - 1
MAX_THREADS = 256
MAX_EPOCHS = 1000

PQ_TECHNIQUE = Technique(
    "pq",
    help="fastText product quantization (the .ftz format), optionally after pruning and retraining",
    params={
        "dsub": Param(int, 2, "size of each sub-vector: bytes per row = dim / dsub (at most dim)",
                      minimum=1, maximum=INT32_MAX, candidates=(2, 4, 8)),
        "qnorm": Param(bool, False, "quantize the row norms separately", candidates=(True,)),
        "qout": Param(bool, False, "also quantize the output matrix (needs >= 256 labels)"),
        "cutoff": Param(int, 0, "keep only this many input rows (words and n-grams); 0 keeps all",
                        minimum=0, maximum=INT32_MAX,
                        # Searched with retraining (it needs --train-data): without it a cutoff loses far more.
                        candidates=tuple({"cutoff": rows, "retrain": True}
                                         for rows in (200_000, 100_000, 50_000, 20_000))),
        "retrain": Param(bool, False, "fine-tune the kept rows on --train-data after the cutoff"),
        "epoch": Param(int, None, "retraining epochs (default: the model's own)", minimum=1,
                       maximum=MAX_EPOCHS),
        "lr": Param(float, None, "retraining learning rate (default: fastText's)", minimum=0,
                    maximum=100),
        "thread": Param(int, None, "retraining threads (default: all cores)", minimum=1,
                        maximum=MAX_THREADS),
    },
    requires_data={"retrain": "train"},
)

#: Top-1 predictions of unquantized sources on eval data, by both files' path, size and mtime.
_REFERENCE_PREDICTIONS: dict[tuple[tuple[str, int, int], ...], list[str]] = {}


def product_quantize(model: Model, step: Step, context: Context) -> Model:
    """Apply ``pq`` to ``model`` (whose fastText object is changed in place)."""
    handle: FastTextModel = model.handle
    layout = handle.layout
    params = {key: param.default for key, param in PQ_TECHNIQUE.params.items()} | dict(step.params)
    kept = _rows_to_quantize(handle, params, model.source)
    rows = layout.input.rows
    notes = list(model.notes)
    train_data = context.train_data if params["retrain"] else None
    if params["retrain"] and kept == rows:
        notes.append("retrain had no effect: fastText retrains only after a cutoff below "
                     f"the {rows:,} input rows")
    reference = _reference_predictions(model, context.eval_data)
    with Stopwatch() as quantizing:
        _run_quantize(handle.model, params, train_data, model.source, rows)
    metadata: dict[str, Any] = {
        **model.metadata,
        "quantize_seconds": round(quantizing.ms / 1000, 3),
        "quantized": True,
        "quantized_output": params["qout"],
        "qnorm": params["qnorm"],
        "dsub": params["dsub"],
        "pruned": kept < rows,
        "input_rows": kept,
    }
    if reference is not None and context.eval_data is not None:
        compressed = top_predictions(handle.model, texts_of(context.eval_data))
        metadata["eval_predictions_changed"] = sum(a != b for a, b in zip(reference, compressed))
        metadata["labels_changed_most"] = labels_changed_most(reference, compressed)
    return Model(model.backend, model.source, "ftz", replace(handle, quantized=True),
                 model.inputs, notes, metadata)


def _rows_to_quantize(handle: FastTextModel, params: dict[str, Any], source: Path) -> int:
    """The input rows ``pq`` will quantize; refuse what fastText would exit or crash on."""
    layout = handle.layout
    if not layout.supervised:
        raise UnsupportedError(
            f"pq needs a supervised classifier; this is a {layout.model} word-vector model "
            "(fastText quantizes classifiers only)",
            source,
        )
    if handle.quantized or layout.quantized:
        raise UnsupportedError("the model is already product-quantized; run pq on the original .bin", source)
    if params["dsub"] > layout.dim:
        raise UsageError(
            f"dsub={params['dsub']} is larger than the model's dim {layout.dim}: each row is cut "
            "into sub-vectors of dsub values (dsub=dim keeps one per row)",
            source,
        )
    rows, cutoff = layout.input.rows, params["cutoff"]
    kept = cutoff if 0 < cutoff < rows else rows
    if kept < KSUB:
        reason = f"cutoff={cutoff} keeps {kept} (raise cutoff)" if kept < rows else f"the model has {rows}"
        raise CompressionError(f"product quantization needs at least {KSUB} input rows; {reason}", source)
    if params["qout"] and layout.labels < KSUB:
        raise CompressionError(
            f"qout needs at least {KSUB} labels to quantize the output matrix; the model has {layout.labels}",
            source,
        )
    return kept


def _run_quantize(
    fasttext_model: Any, params: dict[str, Any], train_data: Dataset | None, source: Path,
    layout_rows: int,
) -> None:
    defaults = fasttext_model.f.getArgs()
    try:
        fasttext_model.f.quantize(
            str(train_data.path) if train_data else "",
            params["qout"],
            params["cutoff"] if params["cutoff"] < layout_rows else 0,  # 0: keep all, as asked
            train_data is not None,
            params["epoch"] or defaults.epoch,
            params["lr"] or defaults.lr,
            params["thread"] or os.cpu_count() or 1,
            0,  # verbose
            params["dsub"],
            params["qnorm"],
        )
    except (ValueError, RuntimeError, TypeError) as error:
        raise CompressionError(f"fastText quantize failed: {first_line(error)}", source) from None


def top_predictions(fasttext_model: Any, texts: list[str]) -> list[str]:
    """The best label for each text ('' where fastText predicts none)."""
    labels, _ = fasttext_model.predict(list(texts), k=1)
    return [line[0] if line else "" for line in labels]


def _reference_predictions(model: Model, eval_data: Dataset | None) -> list[str] | None:
    """Top-1 predictions of the unquantized model, computed once per model and data file."""
    if eval_data is None:
        return None
    key = tuple(_identity(path) for path in (model.source, eval_data.path))
    if key not in _REFERENCE_PREDICTIONS:
        _REFERENCE_PREDICTIONS[key] = top_predictions(model.handle.model, texts_of(eval_data))
    return _REFERENCE_PREDICTIONS[key]


def _identity(path: Path) -> tuple[str, int, int]:
    status = path.stat()
    return str(path.resolve()), status.st_size, status.st_mtime_ns
