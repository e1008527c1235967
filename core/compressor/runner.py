"""``compressor run``: validate, load, compress each variant, save, measure, report."""

from __future__ import annotations

import datetime as _dt
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from compressor import environment, fidelity, scratch
from compressor.errors import (
    CompressionError,
    InvalidInputError,
    UnsupportedError,
    UsageError,
)
from compressor.models import Artifact, Context, Dataset, MeasureSettings, Model, ProgressCallback
from compressor.outputs import OutputFolder
from compressor.plugins import PluginHost
from compressor.recipes import ORIGINAL, Variant, variants_from_strings
from compressor.report import Report, VariantResult, summarize_repeats
from compressor.specs import Backend
from compressor.validation import apply_settings, check_data
from compressor.worker import measure_isolated


@dataclass
class RunRequest:
    model: Path
    out: Path
    backend: str | None = None
    variants: Sequence[Variant] = ()
    settings: dict[str, str] = field(default_factory=dict)
    data: Path | None = None
    train_data: Path | None = None
    calibration_data: Path | None = None
    force: bool = False
    trust: bool = False
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    repeats: int = 1
    #: Largest allowed accuracy drop versus the original, in percentage points.
    max_accuracy_drop: float | None = None
    #: Smallest allowed share of inputs whose top prediction matches the original's.
    min_agreement: float | None = None
    #: ``compressor measure``: convert and measure the model as it is, no variants.
    original_only: bool = False


def _no_progress(message: str, fraction: float | None) -> None:
    return None


@contextmanager
def plugin_errors(backend: Backend | None) -> Iterator[None]:
    """Turn a missing framework inside a plugin into an install hint."""
    try:
        yield
    except ModuleNotFoundError as error:
        hint = f"; install it with: {backend.install_hint()}" if backend else ""
        name = f"backend {backend.name!r}" if backend else "a plugin"
        raise UnsupportedError(f"{name} needs the module {error.name!r}{hint}") from None


def resolve_backend(host: PluginHost, path: Path, requested: str | None) -> Backend:
    if requested is None:
        requested = host.hook.compressor_identify(path=path)
        if requested is None:
            formats = "; ".join(
                f"{b.name}: {', '.join(b.formats)}" for b in host.backends().values()
            )
            raise UnsupportedError(
                f"no backend recognises this file; pass --backend (known formats: {formats})",
                path,
            )
    backend = host.backend(requested)
    missing = backend.missing_modules()
    if missing:
        raise UnsupportedError(
            f"backend {backend.name!r} needs {', '.join(missing)}; install it with: "
            f"{backend.install_hint()}"
        )
    return backend


def load_model(host: PluginHost, backend: Backend, path: Path, context: Context) -> Model:
    with plugin_errors(backend):
        model = host.hook_for(backend.name, "compressor_load")(
            path=path, backend=backend.name, context=context
        )
    if model is None:
        raise InvalidInputError(f"backend {backend.name!r} cannot read this file", path)
    return model


def load_data(
    host: PluginHost, backend: Backend, path: Path | None, purpose: str, model: Model
) -> Dataset | None:
    if path is None:
        return None
    if not path.exists():
        raise InvalidInputError("data file not found", path)
    with plugin_errors(backend):
        dataset = host.hook_for(backend.name, "compressor_load_data")(
            path=path, purpose=purpose, inputs=model.inputs, backend=backend.name
        )
    if dataset is None:
        raise UsageError(f"backend {backend.name!r} cannot read {purpose} data in this format", path)
    return dataset


def run(request: RunRequest, host: PluginHost, progress: ProgressCallback = _no_progress) -> Report:
    if not request.model.exists():
        raise InvalidInputError("no such file or folder", request.model)
    backend = resolve_backend(host, request.model, request.backend)
    wanted = request.variants or variants_from_strings(backend.default_variants)
    if request.original_only:
        wanted = []
    elif not wanted:
        raise UsageError("nothing to do: ask for --quantize, --prune, --pq or a --recipe")
    variants, options = apply_settings(backend, wanted, request.settings)
    request = replace(request, measure=replace(request.measure, options=options))
    data_paths = [p for p in (request.data, request.train_data, request.calibration_data) if p]
    output = OutputFolder(request.out, [request.model, *data_paths], request.force)
    output.check()
    scratch.remove_stale()
    with scratch.scratch_folder(scratch.WORK) as workdir:
        context = Context(options=options, trust=request.trust, workdir=workdir, progress=progress)
        progress(f"loading {request.model}", None)
        original = load_model(host, backend, request.model, context)
        context.eval_data = load_data(host, backend, request.data, "eval", original)
        context.train_data = load_data(host, backend, request.train_data, "train", original)
        context.calibration_data = load_data(
            host, backend, request.calibration_data, "calibration", original
        )
        check_data(backend, variants, context)
        output.prepare()
        try:
            report, artifacts = _run_variants(
                host, backend, request, original, variants, context, output, progress
            )
            output.publish(artifacts, render_reports(report))
        except BaseException:
            output.abort()
            raise
        finally:
            output.close()
    write_chart(report, output.path / "report.png")
    return report


def write_chart(report: Report, path: Path) -> None:
    """The main chart as PNG when matplotlib is installed; never a stale one."""
    from compressor.charts import write_png

    if not write_png(report, path):
        path.unlink(missing_ok=True)


def _run_variants(
    host: PluginHost,
    backend: Backend,
    request: RunRequest,
    original: Model,
    variants: Sequence[Variant],
    context: Context,
    output: OutputFolder,
    progress: ProgressCallback,
) -> tuple[Report, list[Artifact]]:
    """Compress, save (into staging) and measure every variant."""
    results: list[VariantResult] = []
    artifacts: list[Artifact | None] = []
    for index, variant in enumerate([Variant(ORIGINAL, ()), *variants]):
        result = VariantResult(variant.name, [str(step) for step in variant.steps])
        results.append(result)
        progress(f"[{index + 1}/{len(variants) + 1}] {variant.name}", None)
        started = time.perf_counter()
        try:
            model = original if index == 0 else load_model(host, backend, request.model, context)
            for step in variant.steps:
                with plugin_errors(backend):
                    compressed = host.hook_for(backend.name, "compressor_compress")(
                        model=model, step=step, context=context
                    )
                if compressed is None:
                    raise CompressionError(f"no plugin applied '{step}'")
                model = compressed
            with plugin_errors(backend):
                staged = host.hook_for(backend.name, "compressor_save")(
                    model=model, destination=output.staging_path(variant.name), context=context
                )
            if staged is None:
                raise CompressionError(f"backend {backend.name!r} did not save the model")
        except CompressionError as error:
            result.error = str(error)
            artifacts.append(None)
            continue
        result.artifact = staged.path.name
        result.notes = list(model.notes)
        result.metadata = dict(model.metadata)
        result.metrics["compress_seconds"] = round(time.perf_counter() - started, 3)
        artifacts.append(staged)
    if artifacts[0] is None:
        raise CompressionError(f"could not convert the original model: {results[0].error}")
    _measure(host, request, original, results, artifacts, context.eval_data, progress)
    report = Report(
        model=str(request.model),
        backend=backend.name,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        variants=results,
        settings={**request.measure.to_json(), "repeats": request.repeats},
        environment=environment.describe(backend.distributions),
        budgets={
            "max_accuracy_drop": request.max_accuracy_drop,
            "min_agreement": request.min_agreement,
        },
    )
    apply_budgets(report)
    return report, [artifact for artifact in artifacts if artifact is not None]


def render_reports(report: Report) -> dict[str, str]:
    """Every text report format, by file name."""
    from compressor.html_report import render_html
    from compressor.report import render_markdown

    return {
        "report.json": report.to_json(),
        "report.md": render_markdown(report),
        "report.html": render_html(report),
    }


def _measure(
    host: PluginHost,
    request: RunRequest,
    original: Model,
    results: list[VariantResult],
    artifacts: list[Artifact | None],
    eval_data: Dataset | None,
    progress: ProgressCallback,
) -> None:
    """Measure every artifact in its own subprocess; repeats interleave the
    variants so that drift of the machine hits all of them alike."""
    runs: list[list[Any]] = [[] for _ in results]
    for repeat in range(request.repeats):
        for index, artifact in enumerate(artifacts):
            if artifact is None:
                continue
            progress(f"measuring {results[index].name} ({repeat + 1}/{request.repeats})", None)
            with plugin_errors(host.backend(artifact.backend)):
                runs[index].append(
                    measure_isolated(
                        artifact, request.data, original.inputs, request.measure, host.extra_modules
                    )
                )
    reference = runs[0][0] if runs[0] else None
    labels = _labels(eval_data, request.measure)
    for result, measured in zip(results, runs):
        if not measured:
            continue
        metrics = summarize_repeats([m.metrics for m in measured])
        metrics.update(_repeat_spread([m.metrics for m in measured]))
        latest = measured[0]
        if latest.predictions is not None:
            if "accuracy" not in metrics and labels is not None:
                value = fidelity.accuracy(latest.predictions, labels)
                if value is not None:
                    metrics["accuracy"] = value
            if reference is not None and reference.predictions is not None:
                metrics.update(fidelity.compare(reference.predictions, latest.predictions, labels))
        if latest.outputs is not None and reference is not None and reference.outputs is not None:
            similarity = fidelity.cosine(reference.outputs, latest.outputs)
            if similarity is not None:
                metrics["cosine"] = similarity
        result.metrics = {**result.metrics, **metrics}


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


def apply_budgets(report: Report) -> None:
    budgets = report.budgets
    base = report.variants[0].metrics.get("accuracy") if report.variants else None
    for variant in report.variants[1:]:
        metrics = variant.metrics
        drop_limit, agreement_limit = budgets.get("max_accuracy_drop"), budgets.get("min_agreement")
        if drop_limit is not None and base is not None and metrics.get("accuracy") is not None:
            drop = (base - metrics["accuracy"]) * 100
            if drop > drop_limit:
                variant.budget_failures.append(
                    f"accuracy drop {drop:.2f} pt exceeds --max-accuracy-drop {drop_limit:g}"
                )
        agreement = metrics.get("agreement")
        if agreement_limit is not None and agreement is not None and agreement < agreement_limit:
            variant.budget_failures.append(
                f"agreement {agreement:.4f} below --min-agreement {agreement_limit:g}"
            )
        budgeted = drop_limit is not None or agreement_limit is not None
        measured = "accuracy" in metrics or "agreement" in metrics
        if budgeted and variant.error is None and not measured:
            variant.budget_failures.append("budget set but no accuracy/agreement measured (pass --data)")
