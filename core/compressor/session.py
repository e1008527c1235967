"""One model loaded once, with its data and its output folder: what ``run`` and
``search`` make, measure and score variants through.

Opening a session checks the request, resolves the backend, loads the model
and the data, checks disk space and prepares ``--out`` (nothing is written
before); leaving it publishes nothing by itself, aborts the output folder on
any error (interrupts included) and removes the scratch folder.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from compressor import environment, scratch
from compressor.children import out_of_memory_named
from compressor.errors import CompressionError, InvalidInputError
from compressor.memory import PeakRss
from compressor.models import Artifact, Context, Model, ProgressCallback
from compressor.outputs import OutputFolder
from compressor.plugins import PluginHost, plugin_errors
from compressor.recipes import ORIGINAL, Variant, check_name
from compressor.report import Report, VariantResult
from compressor.specs import Backend


def budgets_of(request: Any) -> dict[str, float | None]:
    return {"max_accuracy_drop": request.max_accuracy_drop, "min_agreement": request.min_agreement,
            "min_cosine": request.min_cosine}


class Session:
    def __init__(self, request: Any, host: PluginHost, progress: ProgressCallback,
                 variants: Sequence[Variant] = ()) -> None:
        from compressor.runner import resolve_backend, saved_as_hint
        from compressor.validation import apply_settings, check_measure_request

        check_measure_request(request.measure, request.repeats, budgets_of(request))
        if not request.model.exists():
            raise InvalidInputError("no such file or folder" + saved_as_hint(request.model), request.model)
        for variant in variants:  # names become file names in --out: however the variants were made
            check_name(variant.name)
        self.host, self.progress = host, progress
        self.backend: Backend = resolve_backend(host, request.model, request.backend)
        self.variants, self.options = apply_settings(self.backend, variants, request.settings)
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
        from compressor.runner import load_data, load_model
        from compressor.validation import check_data

        request = self.request
        scratch.remove_stale()
        try:
            workdir = self._stack.enter_context(scratch.scratch_folder(scratch.WORK))
            self.context = Context(options=self.options, trust=request.trust, workdir=workdir,
                                   progress=self.progress)
            self.progress(f"loading {request.model}", None)
            started = time.perf_counter()
            with PeakRss() as load_peak:
                original = load_model(self.host, self.backend, request.model, self.context)
            original.inputs = with_batch_axes(original.inputs, self.options)
            self.original = original
            self.loading = {"load_seconds": round(time.perf_counter() - started, 3),
                            "load_peak_rss_bytes": load_peak.bytes}
            context = self.context
            context.eval_data = load_data(self.host, self.backend, request.data, "eval", original,
                                          request.measure.max_examples)
            context.train_data = load_data(self.host, self.backend, request.train_data, "train", original)
            context.calibration_data = load_data(self.host, self.backend, request.calibration_data,
                                                 "calibration", original)
            check_data(self.backend, self.variants, context)
            if request.check_space:
                from compressor.diskspace import check_free_space

                check_free_space(request.model, self.variants, self.output.path, workdir, original.source_bytes)
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
        """Variants checked against the backend's declaration (parameters coerced, defaults filled)."""
        from compressor.validation import apply_settings, check_data

        validated, _ = apply_settings(self.backend, variants, self.request.settings)
        check_data(self.backend, validated, self.context)
        return validated

    def make(self, variant: Variant) -> tuple[VariantResult, Artifact | None]:
        """Fork the loaded model, apply the steps, save into staging: the result (its
        error set if a step failed) and the staged artifact."""
        result = VariantResult(variant.name, [str(step) for step in variant.steps])
        started = time.perf_counter()
        try:
            with PeakRss() as peak:
                model, staged = self._make(variant)
        except CompressionError as error:
            result.error = str(error)
            return result, None
        result.artifact = staged.path.name
        result.notes = list(model.notes)
        result.metadata = dict(model.metadata)
        result.metrics["compress_seconds"] = round(time.perf_counter() - started, 3)
        if peak.bytes is not None:
            result.metrics["compress_peak_rss_bytes"] = peak.bytes
        if variant.name == ORIGINAL:
            result.metrics.update({key: value for key, value in self.loading.items() if value is not None})
            for dataset in (self.context.eval_data, self.context.calibration_data, self.context.train_data):
                result.notes += dataset.notes if dataset is not None else []
        return result, staged

    def _make(self, variant: Variant) -> tuple[Model, Artifact]:
        from compressor.runner import fork_model

        assert self.original is not None, "enter the session first"
        backend, context = self.backend, self.context
        is_original = variant.name == ORIGINAL
        model = self.original if is_original else fork_model(
            self.host, backend, self.original, self.request.model, context)
        for step in variant.steps:
            with plugin_errors(backend), out_of_memory_named(step):
                compressed = self.host.hook_for(backend.name, "compressor_compress")(
                    model=model, step=step, context=context)
            if compressed is None:
                raise CompressionError(f"no plugin applied '{step}'")
            model = compressed
        with plugin_errors(backend):
            staged = self.host.hook_for(backend.name, "compressor_save")(
                model=model, destination=self.output.staging_path(variant.name), context=context)
        if staged is None:
            raise CompressionError(f"backend {backend.name!r} did not save the model")
        return model, staged

    def report(self, results: list[VariantResult], **extra: Any) -> Report:
        """The report of ``results`` (budgets and warnings applied)."""
        from compressor.cautions import apply_cautions
        from compressor.evaluation import apply_budgets

        request = self.request
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
        from compressor.runner import render_reports

        self.output.publish(list(artifacts), {**render_reports(report), **(texts or {})},
                            chart=lambda path: write_png(report, path), copies=copies, stale=stale)

    @property
    def out(self) -> Path:
        return self.output.path
