"""One model loaded once, with its data and its output folder: what ``run`` and
``search`` make, measure and score variants through.

Making a session checks the request with nothing loaded (:func:`checked_plan`:
the backend, resolved once, every step and parameter, the options, the data each
step needs); opening it loads the model and the data, asks the backend's plugin
about every variant (``compressor_check_steps``), checks disk space and prepares
``--out`` (nothing is written before); leaving it publishes nothing by itself,
aborts the output folder on any error (interrupts included) and removes the
scratch folder.

A plugin's exception while a variant is forked, compressed or saved fails that
variant only (exit 7 at the end of the run), named with the plugin and the step;
its traceback is kept for ``--debug`` (:attr:`Session.failures`).
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from compressor import environment, scratch
from compressor.backend_resolution import resolve_backend, saved_as_hint
from compressor.budgets import apply_budgets, budgets_of
from compressor.children import out_of_memory_named
from compressor.declarations import asked_for
from compressor.errors import (
    RESOURCE_ERRNOS,
    CompressionError,
    CompressorError,
    InvalidInputError,
    UnsupportedError,
    UsageError,
    first_line,
)
from compressor.loading import fork_model, load_data, load_model
from compressor.memory import PeakRss
from compressor.models import Artifact, Context, Model, ProgressCallback, Step
from compressor.outputs import OutputFolder
from compressor.plugins import PluginHost, plugin_errors
from compressor.recipes import ORIGINAL, Variant, check_name, variants_from_strings
from compressor.report import Report, VariantResult, render_reports
from compressor.run_progress import RunProgress, tracking
from compressor.run_request import RunRequest
from compressor.specs import Backend


@dataclass
class Plan:
    """A request checked against its backend before anything is loaded: the backend, the
    variants with their parameters coerced and defaults filled, and the options."""

    backend: Backend
    variants: list[Variant]
    options: dict[str, Any]
    #: The variants are the backend's defaults: one the loaded model cannot take is left
    #: out with a note (:meth:`Session.check_steps`), not an error.
    optional: bool = False


def checked_plan(request: RunRequest, host: PluginHost, variants: Sequence[Variant] = (),
                 defaults: bool = False) -> Plan:
    """Every check that needs nothing loaded: measuring bounds, the model's existence, the
    variants' names, the backend (installed, not broken), every step's technique, mode and
    parameters, the options, and the data each step needs (``--train-data``...).
    ``defaults``: without ``variants``, the backend's default variants (``compressor run``)."""
    from compressor.validation import apply_settings, check_data, check_measure_request

    check_measure_request(request.measure, request.repeats, budgets_of(request))
    if not request.model.exists():
        raise InvalidInputError("no such file or folder" + saved_as_hint(request.model), request.model)
    for variant in variants:  # names become file names in --out: however the variants were made
        check_name(variant.name)
    backend = resolve_backend(host, request.model, request.backend)
    wanted, optional = list(variants), False
    if defaults and not wanted:
        wanted, optional = variants_from_strings(backend.default_variants), True
        if not wanted:
            raise UsageError(f"nothing to do: ask for {asked_for(host)}")
    validated, options = apply_settings(backend, wanted, request.settings)
    check_data(backend, validated, request.given_data())
    return Plan(backend, validated, options, optional)


@dataclass
class VariantFailure:
    """A variant a plugin's exception failed: its traceback, shown with ``--debug``."""

    variant: str
    traceback: str


@contextmanager
def plugin_raised(backend: Backend, what: str) -> Iterator[None]:
    """An unexpected exception of the plugin in the block as a :class:`CompressionError`
    naming the plugin and ``what`` it was doing (the variant fails, the run goes on), with
    the plugin's traceback for ``--debug``. Core's own errors, running out of memory or
    disk, and interrupts pass unchanged."""
    import traceback

    try:
        yield
    except (CompressorError, MemoryError):
        raise
    except Exception as error:
        if isinstance(error, OSError) and error.errno in RESOURCE_ERRNOS:
            raise
        failure = CompressionError(f"plugin {backend.plugin_name!r} (backend {backend.name!r}) raised "
                                   f"{type(error).__name__} {what}: {first_line(error)}")
        failure.plugin_tracebacks = [f"plugin {backend.plugin_name!r} {what}:\n"
                                     + "".join(traceback.format_exception(error)).rstrip()]
        # The traceback is kept as text: the exception's frames would keep the model alive.
        raise failure from None


class Session:
    def __init__(self, request: RunRequest, host: PluginHost, progress: ProgressCallback,
                 variants: Sequence[Variant] = (), optional: bool = False, plan: Plan | None = None) -> None:
        """``plan``: the request checked already (:func:`checked_plan`), else it is checked here
        with ``variants``. ``optional``: the variants are the backend's defaults; one the loaded
        model cannot take (:meth:`check_steps` says unsupported) is left out with a note."""
        plan = plan if plan is not None else checked_plan(request, host, variants)
        self.host = host
        self.progress: RunProgress = tracking(progress)
        self.backend: Backend = plan.backend
        self.variants, self.options = plan.variants, plan.options
        self.optional = optional or plan.optional
        #: Default variants left out, and why (for the original's notes).
        self.left_out: list[str] = []
        #: Variants a plugin's exception failed, with its traceback (for ``--debug``).
        self.failures: list[VariantFailure] = []
        self.request = replace(request, measure=replace(request.measure, options=self.options))
        data_paths = [p for p in (request.data, request.train_data, request.calibration_data) if p]
        self.output = OutputFolder(request.out, [request.model, *data_paths], request.force)
        self.output.check()
        self._stack = ExitStack()
        self.context = Context()
        self.original: Model | None = None
        self.loading: dict[str, Any] = {}

    def __enter__(self) -> Session:
        from compressor.feeding import with_batch_axes
        from compressor.validation import check_data

        request = self.request
        scratch.remove_stale()
        try:
            workdir = self._stack.enter_context(scratch.scratch_folder(scratch.WORK))
            self.context = Context(options=self.options, trust=request.trust, workdir=workdir,
                                   progress=self.progress)
            self.progress.begin(f"loading {request.model}")
            started = time.perf_counter()
            with PeakRss() as load_peak:
                original = load_model(self.host, self.backend, request.model, self.context)
            original.inputs = with_batch_axes(original.inputs, self.options)
            self.original = original
            self.loading = {"load_seconds": round(time.perf_counter() - started, 3),
                            "load_peak_rss_bytes": load_peak.bytes}
            context = self.context
            context.eval_data = load_data(self.host, self.backend, request.data, "eval", original,
                                          request.measure.max_examples, context)
            context.train_data = load_data(self.host, self.backend, request.train_data, "train", original,
                                           context=context)
            context.calibration_data = load_data(self.host, self.backend, request.calibration_data,
                                                 "calibration", original, context=context)
            if context.eval_data is not None and context.eval_data.prepared is not None:
                # Text tokenized here: the measuring processes read its arrays.
                self.request = replace(self.request, data=context.eval_data.prepared)
            check_data(self.backend, self.variants, context)
            self.variants = self.check_steps(self.variants)
            if request.check_space:
                from compressor.diskspace import check_free_space

                check_free_space(request.model, self.variants, self.output.path, workdir, original.source_bytes,
                                 self.backend.techniques)
            self.output.prepare()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        try:
            if kind is not None:
                self.output.abort()
        finally:
            self.output.close()
            self._stack.close()

    def validate(self, variants: Sequence[Variant]) -> list[Variant]:
        """Variants checked against the backend's declaration (parameters coerced, defaults
        filled) and by the backend's plugin against the loaded model."""
        from compressor.validation import apply_settings, check_data

        validated, _ = apply_settings(self.backend, variants, self.request.settings)
        check_data(self.backend, validated, self.context)
        return self.check_steps(validated)

    def check_steps(self, variants: Sequence[Variant]) -> list[Variant]:
        """What the plugin refuses for the loaded model (``compressor_check_steps``), before
        any work; with ``optional`` variants, those it calls unsupported are left out."""
        if self.original is None or not variants:
            return list(variants)
        check = self.host.hook_for(self.backend.name, "compressor_check_steps")
        kept = []
        for variant in variants:
            try:
                with plugin_errors(self.backend):
                    check(model=self.original, steps=list(variant.steps), context=self.context)
            except UnsupportedError as error:
                if not self.optional:
                    raise
                self.left_out.append(f"default variant '{variant.name}' not made: {error.message}")
                continue
            kept.append(variant)
        return kept

    def make(self, variant: Variant, label: str | None = None) -> tuple[VariantResult, Artifact | None]:
        """Fork the loaded model, apply the steps, save into staging: the result (its
        error set if a step failed) and the staged artifact. With ``label`` ("[2/4] int8")
        every step and the save are a unit of the run's progress; without, messages only.
        (Several variants at once, each shared step once: :mod:`compressor.tree_making`.)

        The result's notes and metadata are the saved model's, with what saving reported
        (``Artifact.notes``/``Artifact.metadata``) added."""
        started = time.perf_counter()
        try:
            with PeakRss() as peak:
                model, staged = self._make(variant, label)
        except CompressionError as error:
            return self.failed(variant, error), None
        return self.made(variant, model, staged, time.perf_counter() - started, peak.bytes), staged

    def failed(self, variant: Variant, error: CompressionError) -> VariantResult:
        """The result of a variant that ``error`` failed (its plugin tracebacks kept for ``--debug``)."""
        result = VariantResult(variant.name, [str(step) for step in variant.steps])
        result.error = str(error)
        self.failures += [VariantFailure(variant.name, text) for text in error.plugin_tracebacks]
        return result

    def made(self, variant: Variant, model: Model, staged: Artifact, seconds: float,
             peak_bytes: int | None) -> VariantResult:
        """The result of a variant made in ``seconds`` (its whole path) at ``peak_bytes`` of RSS."""
        result = VariantResult(variant.name, [str(step) for step in variant.steps])
        result.artifact = staged.path.name
        result.notes = [*model.notes, *staged.notes]
        result.metadata = {**model.metadata, **staged.metadata}
        result.metrics["compress_seconds"] = round(seconds, 3)
        if peak_bytes is not None:
            result.metrics["compress_peak_rss_bytes"] = peak_bytes
        if variant.name == ORIGINAL:
            result.metrics.update({key: value for key, value in self.loading.items() if value is not None})
            for dataset in (self.context.eval_data, self.context.calibration_data, self.context.train_data):
                result.notes += dataset.notes if dataset is not None else []
        return result

    def _make(self, variant: Variant, label: str | None = None) -> tuple[Model, Artifact]:
        assert self.original is not None, "enter the session first"
        if variant.name == ORIGINAL:
            model = self.original
        else:
            model = self.fork_original(repr(variant.name))
        for step in variant.steps:
            self.tell(label, str(step))
            model = self.apply(model, step)
        self.tell(label, "saving")
        return model, self.save(model, variant.name)

    def fork_original(self, what: str) -> Model:
        """A fresh starting point from the loaded model (its backend's fork, or a new load)."""
        assert self.original is not None, "enter the session first"
        with plugin_raised(self.backend, f"while forking the loaded model for {what}"):
            return fork_model(self.host, self.backend, self.original, self.request.model, self.context)

    def apply(self, model: Model, step: Step) -> Model:
        """``step`` applied to ``model`` by the backend's plugin."""
        backend = self.backend
        with plugin_raised(backend, f"at step '{step}'"), plugin_errors(backend), out_of_memory_named(step):
            compressed = self.host.hook_for(backend.name, "compressor_compress")(
                model=model, step=step, context=self.context)
        if compressed is None:
            raise CompressionError(f"no plugin applied '{step}'")
        return compressed

    def save(self, model: Model, name: str) -> Artifact:
        """``model`` saved into staging as variant ``name``."""
        backend = self.backend
        with plugin_raised(backend, f"while saving {name!r}"), plugin_errors(backend):
            staged = self.host.hook_for(backend.name, "compressor_save")(
                model=model, destination=self.output.staging_path(name), context=self.context)
        if staged is None:
            raise CompressionError(f"backend {backend.name!r} did not save the model")
        return staged

    def tell(self, label: str | None, what: str) -> None:
        if label is None:
            self.progress(what, None)
        else:
            self.progress.begin(f"{label}: {what}")

    def report(self, results: list[VariantResult], **extra: object) -> Report:
        """The report of ``results`` (budgets and warnings applied)."""
        from compressor.cautions import apply_cautions
        from compressor.model_identity import model_file

        request = self.request
        if results and results[0].name == ORIGINAL and "model_file" not in results[0].metadata:
            # Which model this was, for ``compressor compare`` to tell runs of different models apart.
            results[0].metadata["model_file"] = model_file(
                request.model, self.original.inputs if self.original is not None else ())
        report = Report(
            model=str(request.model),
            backend=self.backend.name,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            variants=results,
            settings={**request.measure.to_json(), "repeats": request.repeats, **extra},
            environment=environment.describe(self.backend.distributions),
            budgets=budgets_of(request),
        )
        apply_budgets(report)
        apply_cautions(report)
        return report

    def publish(self, report: Report, artifacts: Sequence[Artifact], texts: dict[str, str] | None = None,
                copies: dict[str, Path] | None = None, stale: Sequence[str] = ()) -> None:
        """Put the artifacts, the reports and their chart (plus ``texts`` and ``copies``) into
        ``--out``, all or nothing (see :meth:`OutputFolder.publish`)."""
        from compressor.charts import write_png

        self.output.publish(list(artifacts), {**render_reports(report), **(texts or {})},
                            chart=lambda path: write_png(report, path), copies=copies, stale=stale)

    @property
    def out(self) -> Path:
        return self.output.path
