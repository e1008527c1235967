"""``compressor run``: validate, load, compress each variant, save, measure, report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.errors import (
    CompressionError,
    InvalidInputError,
    UnsupportedError,
    UsageError,
)
from compressor.evaluation import measure_original, measure_variants
from compressor.models import Artifact, Context, Dataset, MeasureSettings, Model, ProgressCallback
from compressor.plugins import PluginHost, plugin_errors
from compressor.recipes import ORIGINAL, Variant, variants_from_strings
from compressor.report import Report, VariantResult
from compressor.specs import Backend


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
    #: Smallest allowed mean cosine similarity of the compared output to the original's.
    min_cosine: float | None = None
    #: ``compressor measure``: convert and measure the model as it is, no variants.
    original_only: bool = False
    #: Refuse to start when the artifacts would not fit on disk (``--no-space-check``).
    check_space: bool = True
    #: Where variants are made and measured: ``local``, or ``ray`` (a local Ray, or ``ray_address``).
    executor: str = "local"
    ray_address: str | None = None
    #: Seconds to reach ``ray_address`` (None: ``compressor.ray_cluster.DEFAULT_TIMEOUT``).
    ray_timeout: float | None = None


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
    limit: int | None = None, context: Context | None = None,
) -> Dataset | None:
    if path is None:
        return None
    if not path.exists():
        raise InvalidInputError("data file not found", path)
    with plugin_errors(backend):
        dataset = host.hook_for(backend.name, "compressor_load_data")(
            path=path, purpose=purpose, inputs=model.inputs, backend=backend.name, limit=limit,
            model_path=model.source, context=context,
        )
    if dataset is None:
        raise UsageError(f"backend {backend.name!r} cannot read {purpose} data in this format", path)
    return dataset


class PlannedRun:
    """One backend's ``compressor run``, in the order that refuses before work.

    Making it checks the whole request with nothing loaded; entering it loads the model
    and the data and asks the plugin about every variant; :meth:`start` makes and
    measures the original (the data, the labels and output options are checked against
    its outputs then); :meth:`finish` makes and measures the variants and publishes. A
    multi-backend run makes every backend's plan, enters and starts each before any
    variant is made (:func:`compressor.multirun.run_many`)."""

    def __init__(self, request: RunRequest, host: PluginHost, progress: ProgressCallback = _no_progress) -> None:
        from compressor.run_progress import tracking
        from compressor.session import Session

        self.request, self.host = request, host
        self.progress = tracking(progress)
        backend = resolve_backend(host, request.model, request.backend) if request.model.exists() else None
        wanted = [] if request.original_only else list(request.variants)
        defaulted = not wanted and not request.original_only
        if defaulted and backend is not None:
            wanted = variants_from_strings(backend.default_variants)
            if not wanted:
                raise UsageError("nothing to do: ask for --quantize, --prune, --pq or a --recipe")
        self.session = Session(request, host, self.progress, wanted, optional=defaulted)
        self.results: list[VariantResult] = []
        self.artifacts: list[Artifact | None] = []
        self.reference: Any = None
        self.progress.plan(self._units())

    def _units(self) -> int:
        """Loading, the original, each variant's steps and save, every measurement."""
        variants = self.session.variants
        if self.request.executor == "ray":  # loading, making them all, the original's measuring, each repeat's
            return 3 + self.request.repeats
        made = 1 + sum(self.session.units(variant) for variant in variants)
        return 1 + made + self.request.repeats * (1 + len(variants))

    def __enter__(self) -> PlannedRun:
        self.session.__enter__()
        return self

    def __exit__(self, *exception: Any) -> None:
        self.session.__exit__(*exception)

    @property
    def everything(self) -> list[Variant]:
        return [Variant(ORIGINAL, ()), *self.session.variants]

    def _label(self, index: int) -> str:
        return f"[{index + 1}/{len(self.everything)}] {self.everything[index].name}"

    def start(self) -> None:
        """Make and measure the original (on Ray: nothing here, the executor does it)."""
        if self.request.executor == "ray":
            return
        session = self.session
        result, artifact = session.make(Variant(ORIGINAL, ()), self._label(0))
        result.notes += session.left_out
        self.results, self.artifacts = [result], [artifact]
        if artifact is None:
            raise CompressionError(f"could not convert the original model: {result.error}", self.request.model)
        self.reference = measure_original(
            self.host, result, artifact, session.request.data, session.context.eval_data,
            session.original.inputs if session.original else (), session.request.measure,
            self.request.repeats, self.progress, self.request.model)

    def finish(self) -> Report:
        """Make and measure every variant, report and publish."""
        session, request, progress = self.session, self.request, self.progress
        if request.executor == "ray":
            from compressor.ray_executor import run_on_ray

            results, artifacts = run_on_ray(session, session.variants, progress)
            results[0].notes += session.left_out
            report = session.report(results, executor="ray")
            session.publish(report, [artifact for artifact in artifacts if artifact is not None])
            return report
        for index, variant in enumerate(self.everything[1:], start=1):
            try:
                result, artifact = session.make(variant, self._label(index))
            except UnsupportedError as error:
                if not session.optional:
                    raise
                # A default variant this model cannot take (pq on an .ftz, quantized already): said, not run.
                self.results[0].notes.append(f"default variant '{variant.name}' not made: {error.message}")
                continue
            self.results.append(result)
            self.artifacts.append(artifact)
        measured = measure_variants(
            self.host, self.results, self.artifacts, session.request.data, session.context.eval_data,
            session.original.inputs if session.original else (), session.request.measure,
            request.repeats, progress, request.model, first=self.reference,
        )
        report = session.report(self.results)
        # For comparisons across runs (several backends): not part of report.json.
        report.measured = measured  # type: ignore[attr-defined]
        report.eval_data = session.context.eval_data  # type: ignore[attr-defined]
        session.publish(report, [artifact for artifact in self.artifacts if artifact is not None])
        return report


def run(request: RunRequest, host: PluginHost, progress: ProgressCallback = _no_progress) -> Report:
    """``compressor run``: every refusal before any work, then the original, then the variants."""
    planned = PlannedRun(request, host, progress)
    with planned:
        planned.start()
        report = planned.finish()
    planned.progress.finish()
    return report


def render_reports(report: Report) -> dict[str, str]:
    """Every text report format, by file name."""
    from compressor.html_report import render_html
    from compressor.report import render_markdown

    return {
        "report.json": report.to_json(),
        "report.md": render_markdown(report),
        "report.html": render_html(report),
    }
