"""Measure every variant in its own process and compare it with the original."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from compressor import fidelity
from compressor.budgets import apply_budgets, budget_failures
from compressor.engine import MAX_RETAINED_VALUES
from compressor.errors import CompressorError, InvalidInputError
from compressor.latency_interval import ratio_fields
from compressor.models import Artifact, Dataset, MeasureSettings, ProgressCallback, TensorSpec
from compressor.plugins import PluginHost, plugin_errors
from compressor.results import VariantResult, summarize_repeats
from compressor.worker import MeasuredArtifact, measure_isolated

__all__ = ["HEADLINE_KEYS", "apply_budgets", "budget_failures", "check_reference", "compare_outputs",
           "measure_one", "measure_original", "measure_variants", "measuring_label", "score",
           "with_original_tasks"]


def measure_one(host: PluginHost, artifact: Artifact, data_path: Path | None, inputs: Sequence[TensorSpec],
                settings: MeasureSettings, original: Artifact | None = None) -> MeasuredArtifact:
    """One measurement of ``artifact`` in its own process; with the ``original``'s artifact,
    its latency timed against the original's there, to ``settings.precision``."""
    backend = host.backend(artifact.backend)
    with plugin_errors(backend):
        return measure_isolated(artifact, data_path, inputs, settings, host.extra_modules, backend.plugin_name,
                                original=original)


def measure_variants(
    host: PluginHost,
    results: list[VariantResult],
    artifacts: list[Artifact | None],
    data_path: Path | None,
    eval_data: Dataset | None,
    inputs: Sequence[TensorSpec],
    settings: MeasureSettings,
    repeats: int,
    progress: ProgressCallback,
    source: Path | None = None,
    first: MeasuredArtifact | None = None,
) -> list[MeasuredArtifact | None]:
    """Measure every artifact in its own subprocess; repeats interleave the
    variants so that drift of the machine hits all of them alike. Returns each
    variant's first measurement (None where it failed); the original's, first, is
    the reference the others were scored against. ``first``: the original's first
    measurement, taken already (:func:`measure_original`, before the variants were made).

    The original failing to measure stops the run; a variant failing is that
    variant's error (its artifact is dropped), and the others go on."""
    from compressor.run_progress import begin

    runs: list[list[MeasuredArtifact]] = [[] for _ in results]
    variant_settings = settings
    if first is not None:
        runs[0].append(first)
        variant_settings = with_original_tasks(settings, first)
    for repeat in range(repeats):
        for index, artifact in enumerate(artifacts):
            if artifact is None or (index == 0 and repeat == 0 and first is not None):
                continue
            begin(progress, measuring_label(results[index].name, repeat, repeats))
            try:
                original = artifacts[0] if index > 0 else None
                # Repeats time again; load time, memory, fidelity and sizes are measured once.
                chosen = replace(variant_settings, timing_only=True) if repeat > 0 else variant_settings
                runs[index].append(measure_one(host, artifact, data_path, inputs, chosen, original))
                if index == 0 and repeat == 0:
                    variant_settings = with_original_tasks(settings, runs[0][0])
            except CompressorError as error:
                if index == 0:
                    raise _named_for_the_user(error, artifact, results[0].name, source) from None
                results[index].error = f"measuring failed: {error.message}"
                artifacts[index] = None
                runs[index] = []
    reference = runs[0][0] if runs[0] else None
    if reference is not None and data_path is not None:
        check_reference(reference, eval_data, settings, data_path)
    for result, measured in zip(results, runs):
        if measured:
            score(result, measured, reference, eval_data, settings)
    return [measured[0] if measured else None for measured in runs]


def measuring_label(name: str, repeat: int, repeats: int) -> str:
    """``measuring int8``, or ``measuring int8, repeat 2 of 3``."""
    return f"measuring {name}" + (f", repeat {repeat + 1} of {repeats}" if repeats > 1 else "")


def measure_original(host: PluginHost, result: VariantResult, artifact: Artifact, data_path: Path | None,
                     eval_data: Dataset | None, inputs: Sequence[TensorSpec], settings: MeasureSettings,
                     repeats: int, progress: ProgressCallback, source: Path | None = None) -> MeasuredArtifact:
    """The original's first measurement, taken before any variant is made: what the data,
    the labels and ``--set`` options (``label_output=``, ``task.NAME=``) refuse is refused
    then, and every output's task is decided for the variants to follow."""
    from compressor.run_progress import begin

    begin(progress, measuring_label(result.name, 0, repeats))
    try:
        measured = measure_one(host, artifact, data_path, inputs, settings)
    except CompressorError as error:
        raise _named_for_the_user(error, artifact, result.name, source) from None
    if data_path is not None:
        check_reference(measured, eval_data, settings, data_path)
    return measured


def with_original_tasks(settings: MeasureSettings, reference: MeasuredArtifact) -> MeasureSettings:
    """``settings`` for measuring variants: each output compared as the original's was
    decided (its task, axes, thresholds), whatever the variant's values look like; a causal
    LM's generation against the original's (:func:`compressor.token_divergence.reference_of`)."""
    from compressor.tasks import DECIDED_OPTION
    from compressor.token_divergence import REFERENCE_OPTION, reference_of

    decided = {name: {key: info[key] for key in ("task", "reason", "params", "shape") if key in info}
               for name, info in reference.output_info.items() if info.get("task")}
    options = {**settings.options, DECIDED_OPTION: decided} if decided else dict(settings.options)
    # A causal LM's: the original's top tokens (the variants' KL) and its memory bandwidth.
    generation = reference_of(reference.metrics)
    if generation:
        options[REFERENCE_OPTION] = generation
    return settings if options == settings.options else replace(settings, options=options)


def check_reference(reference: MeasuredArtifact, eval_data: Dataset | None, settings: MeasureSettings,
                    data_path: Path) -> None:
    """The original's measurement fits the data: one prediction per example, labels in range."""
    labels = _labels(eval_data, settings)
    if labels is not None:
        _check_label_range(reference, labels, data_path)


def score(result: VariantResult, measured: list[MeasuredArtifact], reference: MeasuredArtifact | None,
          eval_data: Dataset | None, settings: MeasureSettings) -> None:
    """Fill ``result.metrics`` from its measurements (medians over repeats) and the comparison
    of its outputs with the original's ``reference`` measurement, output by output. A figure
    the backend's runtime reported itself (:meth:`compressor.runtime.Runtime.evaluate`: fastText's
    precision@1 as ``accuracy``) stands where the comparison has one of the same name."""
    labels = _labels(eval_data, settings)
    compared = (reference or measured[0]).metrics.get("compared_examples")
    if compared:
        # Outputs too big to hold for every example: compared on the first ones (engine.py).
        labels = labels[:compared] if labels is not None else None
        note = (f"outputs compared on the first {compared} examples: more would hold over "
                f"{MAX_RETAINED_VALUES / 1e6:.0f} M output values in memory")
        if note not in result.notes:
            result.notes.append(note)
    metrics = summarize_repeats([m.metrics for m in measured])
    metrics.update(_repeat_spread([m.metrics for m in measured]))
    latest = measured[0]
    if latest.kept and reference is not None:
        compared = compare_outputs(reference, latest, labels)
        metrics.update({key: value for key, value in compared.items() if key not in metrics})
    # Issue 27: a causal LM's greedy generation against the original's.
    from compressor.generation import compare_generation

    metrics.update(compare_generation(reference.metrics if reference is not None else {}, metrics))
    if reference is not None and latest is not reference:
        speed, notes = ratio_fields([m.metrics for m in measured], reference.metrics, settings)
        metrics.update(speed)
        result.notes += [note for note in notes if note not in result.notes]
    result.metrics = {**result.metrics, **metrics}


#: Metrics of the compared output (the labels' output, else the first with a headline figure) that
#: also appear at the top of a variant's metrics; ``agreement`` there is the worst headline figure.
HEADLINE_KEYS = ("agreement", "agreement_kind", "agreement_output", "headline_metric", "accuracy", "cosine",
                 "changed_count", "changed_examples", "confusion", "sequence_agreement", "relative_error",
                 "max_abs_error", "perplexity", "perplexity_original", "iou", "abs_error", "exact_match",
                 "char_error_rate", "pixel_agreement", "f1", "detection_f1", "recall", "precision")


def compare_outputs(reference: MeasuredArtifact, variant: MeasuredArtifact, labels: Any | None) -> dict[str, Any]:
    """Every output of ``variant`` against the original's, by its task (see
    :func:`compressor.output_comparison.compare_outputs`)."""
    from compressor.output_comparison import compare_outputs as compare_all

    return compare_all(reference, variant, labels, HEADLINE_KEYS)


def _check_label_range(reference: MeasuredArtifact, labels: Any, data_path: Path) -> None:
    """Integer labels must name one of a classifier's outputs, or accuracy means nothing."""
    import numpy as np

    from compressor.tasks import label_output

    flat = fidelity.flat_labels(labels)
    if not reference.output_info or flat is None or flat.dtype.kind not in "iu" or flat.size == 0:
        return
    labelled = label_output(reference.output_info, labels=flat)
    info = reference.output_info.get(labelled, {}) if labelled else {}
    scores = reference.kept.get(labelled, {}).get("scores") if labelled else None
    if info.get("task") != "classifier" or scores is None:
        return
    outputs = np.asarray(scores)
    if outputs.ndim != 2 or outputs.shape[1] < 2:
        return
    low, high = int(flat.min()), int(flat.max())
    if low < 0 or high >= outputs.shape[1]:
        raise InvalidInputError(
            f"labels 'y' range from {low} to {high} but the model has {outputs.shape[1]} classes "
            f"(0 to {outputs.shape[1] - 1})",
            data_path,
        )


def _named_for_the_user(
    error: CompressorError, artifact: Artifact, variant: str, source: Path | None
) -> CompressorError:
    """An error about a staged artifact (deleted when the run ends) names the user's model instead."""
    if error.path is None or error.path not in artifact.files or source is None:
        return error
    renamed = type(error)(f"{variant} ({artifact.path.name}): {error.message}", source)
    renamed.child_output = error.child_output
    return renamed


def _repeat_spread(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each repeat's p50 (and fastest-window p50) and their coefficient of variation."""
    spread: dict[str, Any] = {}
    for key, name in (("p50", "latency_p50"), ("p50_fastest_window", "latency_fastest_window")):
        values = [run.get("latency_ms", {}).get(key) for run in runs]
        if len(values) > 1 and all(isinstance(value, float) for value in values):
            spread[f"{name}_cv"] = statistics.pstdev(values) / statistics.fmean(values)
            spread[f"{name}_repeats"] = values
    return spread


def _labels(dataset: Dataset | None, settings: MeasureSettings) -> Any | None:
    if dataset is None or dataset.labels is None:
        return None
    if settings.max_examples is not None:
        return dataset.labels[: settings.max_examples]
    return dataset.labels
