"""``compressor run``: validate, load, compress each variant, save, measure, report.

:class:`PlannedRun` orchestrates one backend's run through a
:class:`~compressor.session.Session` (which owns loading, forking and the data)
and returns a typed :class:`RunOutcome`: the report plus what comparisons across
runs need (each variant's measurement, the evaluation data) and the plugin
failures ``--debug`` shows. :func:`run` returns just the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compressor.backend_resolution import resolve_backend, saved_as_hint
from compressor.errors import CompressionError, UnsupportedError
from compressor.evaluation import measure_original, measure_variants
from compressor.loading import fork_model, load_data, load_model
from compressor.models import Artifact, Dataset, ProgressCallback
from compressor.plugins import PluginHost
from compressor.recipes import ORIGINAL, Variant
from compressor.report import Report, VariantResult, render_reports
from compressor.run_request import RunRequest
from compressor.session import Plan, Session, VariantFailure, checked_plan
from compressor.worker import MeasuredArtifact

__all__ = ["PlannedRun", "RunOutcome", "RunRequest", "fork_model", "load_data", "load_model", "render_reports",
           "resolve_backend", "run", "run_outcome", "saved_as_hint"]


def _no_progress(message: str, fraction: float | None) -> None:
    return None


@dataclass
class RunOutcome:
    """What a run made: its report, and what is not part of ``report.json``."""

    report: Report
    #: Each variant's first measurement, in the report's order (None where it failed or was
    #: not measured here): comparisons across runs (several backends) are made from these.
    measured: list[MeasuredArtifact | None] = field(default_factory=list)
    #: The evaluation data the variants were measured on (its labels).
    eval_data: Dataset | None = None
    #: Variants a plugin's exception failed, with the plugin's traceback (``--debug``).
    failures: list[VariantFailure] = field(default_factory=list)


class PlannedRun:
    """One backend's ``compressor run``, in the order that refuses before work.

    Making it checks the whole request with nothing loaded (the backend is resolved once,
    here, or taken from ``plan``); entering it loads the model and the data and asks the
    plugin about every variant; :meth:`start` makes and measures the original (the data,
    the labels and output options are checked against its outputs then); :meth:`finish`
    makes and measures the variants and publishes. A multi-backend run makes every
    backend's plan, enters and starts each before any variant is made
    (:func:`compressor.multirun.run_many`)."""

    def __init__(self, request: RunRequest, host: PluginHost, progress: ProgressCallback = _no_progress,
                 plan: Plan | None = None) -> None:
        from compressor.run_progress import tracking

        self.request, self.host = request, host
        self.progress = tracking(progress)
        if plan is None:
            variants = () if request.original_only else request.variants
            plan = checked_plan(request, host, variants, defaults=not request.original_only)
        self.session = Session(request, host, self.progress, plan=plan)
        self.results: list[VariantResult] = []
        self.artifacts: list[Artifact | None] = []
        self.reference: MeasuredArtifact | None = None
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

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        self.session.__exit__(kind, *rest)

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
            error = CompressionError(f"could not convert the original model: {result.error}", self.request.model)
            error.plugin_tracebacks = [failure.traceback for failure in session.failures]
            raise error
        self.reference = measure_original(
            self.host, result, artifact, session.request.data, session.context.eval_data,
            session.original.inputs if session.original else (), session.request.measure,
            self.request.repeats, self.progress, self.request.model)

    def finish(self) -> RunOutcome:
        """Make and measure every variant, report and publish."""
        session, request, progress = self.session, self.request, self.progress
        if request.executor == "ray":
            from compressor.ray_executor import run_on_ray

            results, artifacts = run_on_ray(session, session.variants, progress)
            results[0].notes += session.left_out
            report = session.report(results, executor="ray")
            session.publish(report, [artifact for artifact in artifacts if artifact is not None])
            # Measured on the cluster: no measurement here to compare across runs.
            return RunOutcome(report, [None] * len(results), session.context.eval_data, list(session.failures))
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
        session.publish(report, [artifact for artifact in self.artifacts if artifact is not None])
        return RunOutcome(report, measured, session.context.eval_data, list(session.failures))


def run_outcome(request: RunRequest, host: PluginHost, progress: ProgressCallback = _no_progress,
                plan: Plan | None = None) -> RunOutcome:
    """``compressor run``: every refusal before any work, then the original, then the variants."""
    planned = PlannedRun(request, host, progress, plan)
    with planned:
        planned.start()
        outcome = planned.finish()
    planned.progress.finish()
    return outcome


def run(request: RunRequest, host: PluginHost, progress: ProgressCallback = _no_progress) -> Report:
    """``compressor run`` (:func:`run_outcome`), its report."""
    return run_outcome(request, host, progress).report

