"""``compressor run``: validate, load, compress each variant, save, measure, report.

:class:`PlannedRun` orchestrates one backend's run through a
:class:`~compressor.session.Session` (which owns loading, forking and the data)
and returns a typed :class:`RunOutcome`: the report plus what comparisons across
runs need (each variant's measurement, the evaluation data) and the plugin
failures ``--debug`` shows. :func:`run` returns just the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from compressor.run_cache import RunCache

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
        from compressor.cache import check_settings
        from compressor.run_progress import tracking

        check_settings()
        self.request, self.host = request, host
        self.progress = tracking(progress)
        if plan is None:
            variants = () if request.original_only else request.variants
            plan = checked_plan(request, host, variants, defaults=not request.original_only)
        self.session = Session(request, host, self.progress, plan=plan)
        self.results: list[VariantResult] = []
        self.artifacts: list[Artifact | None] = []
        self.reference: MeasuredArtifact | None = None
        #: The cache across runs (None: off, a Ray run, or nothing to reuse), opened with the original.
        self.run_cache: RunCache | None = None
        self.progress.plan(self._units())

    def _units(self) -> int:
        """Loading, the original, each variant's steps and save, every measurement."""
        variants = self.session.variants
        if self.request.executor == "ray":  # loading, making them all, the original's measuring, each repeat's
            return 3 + self.request.repeats
        from compressor.tree_making import units

        made = 1 + units(variants)
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
        from compressor.run_cache import open_cache

        self.run_cache = open_cache(replace(self.request, measure=session.request.measure), session.backend,
                                    session.options, self._plugin(), session.variants, artifact)
        self.reference = self._measure_original(result, artifact)

    def _measure_original(self, result: VariantResult, artifact: Artifact) -> MeasuredArtifact:
        """The original measured (what its outputs refuse is refused now), or its measurement
        taken from the cache (same bytes, data, settings and machine) and checked the same way."""
        from compressor.evaluation import check_reference, measuring_label
        from compressor.run_cache import cached_note
        from compressor.run_progress import begin

        session, run_cache, settings = self.session, self.run_cache, self.session.request.measure
        found = run_cache.measured(ORIGINAL) if run_cache is not None else None
        if found is None:
            measured = measure_original(
                self.host, result, artifact, session.request.data, session.context.eval_data,
                session.original.inputs if session.original else (), settings,
                self.request.repeats, self.progress, self.request.model)
            if run_cache is not None and session.context.workdir is not None:
                run_cache.keep_measured(ORIGINAL, measured, session.context.workdir)
            return measured
        begin(self.progress, measuring_label(result.name, 0, self.request.repeats))
        if session.request.data is not None:
            check_reference(found, session.context.eval_data, settings, session.request.data)
        result.notes.append(cached_note(run_cache))  # type: ignore[arg-type]
        return found

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
        self._make_variants(self.run_cache)
        measured = self._measure_variants(self.run_cache)
        report = session.report(self.results)
        session.publish(report, [artifact for artifact in self.artifacts if artifact is not None])
        return RunOutcome(report, measured, session.context.eval_data, list(session.failures))

    def _plugin(self) -> str:
        """The backend plugin's module, name and distribution's version (a cached artifact is its work)."""
        name = self.session.backend.plugin_name
        for info in self.host.plugins():
            if info.name == name:
                return f"{info.module} {name} {info.distribution} {info.version}"
        return f"{name} {name}"

    def _make_variants(self, run_cache: RunCache | None) -> None:
        """Each variant restored from the cache, or made (each shared step once) and cached."""
        from compressor.tree_making import make_variants, units

        session = self.session
        variants = session.variants
        restored: dict[int, tuple[VariantResult, Artifact]] = {}
        for index, variant in enumerate(variants):
            hit = run_cache.restore(variant, lambda name=variant.name: session.output.staging_path(name)) \
                if run_cache is not None else None
            if hit is not None:
                restored[index] = hit
        todo = [index for index in range(len(variants)) if index not in restored]
        if restored:  # the units planned for making them, done
            self.progress.begin(f"{len(restored)} of {len(variants)} variants reused from the cache",
                                units(variants) - units([variants[index] for index in todo]))
        made = dict(zip(todo, make_variants(session, [variants[index] for index in todo],
                                            [self._label(index + 1) for index in todo])))
        for index, variant in enumerate(variants):
            outcome = restored.get(index) or made[index]
            if isinstance(outcome, UnsupportedError):
                # A default variant this model cannot take (pq on an .ftz, quantized already): said, not run.
                self.results[0].notes.append(f"default variant '{variant.name}' not made: {outcome.message}")
                continue
            result, artifact = outcome
            if run_cache is not None and index not in restored and artifact is not None:
                run_cache.keep(variant, result, artifact)
            self.results.append(result)
            self.artifacts.append(artifact)

    def _measure_variants(self, run_cache: RunCache | None) -> list[MeasuredArtifact | None]:
        """Every variant measured, or its measurement taken from the cache (same artifact bytes,
        data, settings and machine), scored against this run's original."""
        from compressor.evaluation import score
        from compressor.run_cache import cached_note

        session, request = self.session, self.request
        settings = session.request.measure
        to_measure = list(self.artifacts)
        cached: dict[int, MeasuredArtifact] = {}
        for index in range(1, len(self.results)):
            found = run_cache.measured(self.results[index].name) if run_cache and to_measure[index] else None
            if found is not None:
                cached[index], to_measure[index] = found, None
        measured = measure_variants(
            self.host, self.results, to_measure, session.request.data, session.context.eval_data,
            session.original.inputs if session.original else (), settings,
            request.repeats, self.progress, request.model, first=self.reference,
        )
        for index, artifact in enumerate(to_measure):
            if artifact is None and index not in cached:
                self.artifacts[index] = None  # failed to measure (or not made)
        for index, found in cached.items():
            score(self.results[index], [found], self.reference, session.context.eval_data, settings)
            self.results[index].notes.append(cached_note(run_cache))  # type: ignore[arg-type]
            measured[index] = found
        if run_cache is not None and session.context.workdir is not None:
            for index, first in enumerate(measured):
                if index > 0 and first is not None and index not in cached and self.artifacts[index] is not None:
                    run_cache.keep_measured(self.results[index].name, first, session.context.workdir)
        return measured


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

