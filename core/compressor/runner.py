"""``compressor run``: validate, load, compress each variant, save, measure, report."""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from compressor import environment, scratch
from compressor.cautions import apply_cautions
from compressor.diskspace import check_free_space
from compressor.errors import (
    CompressionError,
    InvalidInputError,
    UnsupportedError,
    UsageError,
)
from compressor.evaluation import apply_budgets, measure_variants
from compressor.feeding import with_batch_axes
from compressor.memory import PeakRss
from compressor.models import Artifact, Context, Dataset, MeasureSettings, Model, ProgressCallback
from compressor.outputs import OutputFolder
from compressor.plugins import PluginHost, plugin_errors
from compressor.recipes import ORIGINAL, Variant, variants_from_strings
from compressor.report import Report, VariantResult
from compressor.specs import Backend
from compressor.validation import apply_settings, check_data, check_measure_request


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
    #: Refuse to start when the artifacts would not fit on disk (``--no-space-check``).
    check_space: bool = True


def _no_progress(message: str, fraction: float | None) -> None:
    return None


def saved_as_hint(path: Path) -> str:
    """For a path named after a variant (``out/prune0.8-int8.tflite``) in a run's
    folder: where that variant's artifact really is."""
    import json

    report = path.parent / "report.json"
    try:
        variants = json.loads(report.read_text(encoding="utf-8")).get("variants", [])
    except (OSError, ValueError, AttributeError, RecursionError):
        return ""
    for variant in variants if isinstance(variants, list) else []:
        if not isinstance(variant, dict):
            continue
        name, artifact = variant.get("name"), variant.get("artifact")
        if isinstance(artifact, str) and name in (path.name, path.stem) and artifact != path.name:
            return f"; variant {name!r} of {report} is saved as {path.parent / artifact}"
    return ""


def resolve_backend(host: PluginHost, path: Path, requested: str | None) -> Backend:
    if requested is None:
        requested = host.identify(path)
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
    broken = backend.broken_reason()
    if broken:
        raise UnsupportedError(f"backend {backend.name!r} is installed but broken: {broken}")
    return backend


def load_model(host: PluginHost, backend: Backend, path: Path, context: Context) -> Model:
    with plugin_errors(backend):
        model = host.hook_for(backend.name, "compressor_load")(
            path=path, backend=backend.name, context=context
        )
    if model is None:
        raise InvalidInputError(f"backend {backend.name!r} cannot read this file", path)
    return model


def fork_model(
    host: PluginHost, backend: Backend, original: Model, path: Path, context: Context
) -> Model:
    """A variant's starting point: the backend's fork of the loaded model, or a fresh load."""
    with plugin_errors(backend):
        forked = host.hook_for(backend.name, "compressor_fork")(model=original, context=context)
    return forked if forked is not None else load_model(host, backend, path, context)


def load_data(
    host: PluginHost, backend: Backend, path: Path | None, purpose: str, model: Model,
    limit: int | None = None,
) -> Dataset | None:
    if path is None:
        return None
    if not path.exists():
        raise InvalidInputError("data file not found", path)
    with plugin_errors(backend):
        dataset = host.hook_for(backend.name, "compressor_load_data")(
            path=path, purpose=purpose, inputs=model.inputs, backend=backend.name, limit=limit
        )
    if dataset is None:
        raise UsageError(f"backend {backend.name!r} cannot read {purpose} data in this format", path)
    return dataset


def run(request: RunRequest, host: PluginHost, progress: ProgressCallback = _no_progress) -> Report:
    check_measure_request(request.measure, request.repeats, {
        "max_accuracy_drop": request.max_accuracy_drop, "min_agreement": request.min_agreement})
    if not request.model.exists():
        raise InvalidInputError("no such file or folder" + saved_as_hint(request.model), request.model)
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
        started = time.perf_counter()
        with PeakRss() as load_peak:
            original = load_model(host, backend, request.model, context)
        original.inputs = with_batch_axes(original.inputs, options)
        loading = {"load_seconds": round(time.perf_counter() - started, 3),
                    "load_peak_rss_bytes": load_peak.bytes}
        context.eval_data = load_data(
            host, backend, request.data, "eval", original, request.measure.max_examples
        )
        context.train_data = load_data(host, backend, request.train_data, "train", original)
        context.calibration_data = load_data(
            host, backend, request.calibration_data, "calibration", original
        )
        check_data(backend, variants, context)
        if request.check_space:
            check_free_space(request.model, variants, output.path, workdir, original.source_bytes)
        output.prepare()
        try:
            report, artifacts = _run_variants(
                host, backend, request, original, variants, context, output, progress
            )
            report.variants[0].metrics.update(
                {key: value for key, value in loading.items() if value is not None}
            )
            for dataset in (context.eval_data, context.calibration_data, context.train_data):
                report.variants[0].notes += dataset.notes if dataset is not None else []
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
            with PeakRss() as peak:
                model, staged = _make_variant(host, backend, request, original, variant, index == 0,
                                              context, output)
        except CompressionError as error:
            result.error = str(error)
            artifacts.append(None)
            continue
        result.artifact = staged.path.name
        result.notes = list(model.notes)
        result.metadata = dict(model.metadata)
        result.metrics["compress_seconds"] = round(time.perf_counter() - started, 3)
        if peak.bytes is not None:
            result.metrics["compress_peak_rss_bytes"] = peak.bytes
        artifacts.append(staged)
    if artifacts[0] is None:
        raise CompressionError(f"could not convert the original model: {results[0].error}")
    measure_variants(
        host, results, artifacts, request.data, context.eval_data, original.inputs,
        request.measure, request.repeats, progress, request.model,
    )
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
    apply_cautions(report)
    return report, [artifact for artifact in artifacts if artifact is not None]


def _make_variant(
    host: PluginHost, backend: Backend, request: RunRequest, original: Model, variant: Variant,
    is_original: bool, context: Context, output: OutputFolder,
) -> tuple[Model, Artifact]:
    """Fork the loaded model, apply the variant's steps, save it into staging."""
    model = original if is_original else fork_model(host, backend, original, request.model, context)
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
    return model, staged


def render_reports(report: Report) -> dict[str, str]:
    """Every text report format, by file name."""
    from compressor.html_report import render_html
    from compressor.report import render_markdown

    return {
        "report.json": report.to_json(),
        "report.md": render_markdown(report),
        "report.html": render_html(report),
    }
