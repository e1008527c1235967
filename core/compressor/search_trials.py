"""A search's trials: what each one is, and how one is made, measured and judged
(:class:`Searcher`); the loop that proposes them is :mod:`compressor.searching`.

With the cache across runs on (:mod:`compressor.run_cache`), the original's measurement
and each trial's artifact and measurement (the subset one too) are taken from it when an
earlier run or search made them with the same keys as ``compressor run``, and kept for the
next: a search run again makes and measures nothing, and finds the same trials.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from compressor import search_space
from compressor.budgets import budget_failures, budgets_of, violation
from compressor.errors import CompressorError
from compressor.evaluation import measure_one, score, with_original_tasks
from compressor.models import Artifact, MeasureSettings, ProgressCallback
from compressor.ray_executor import Made, RayExecutor, made_from, stage
from compressor.recipes import ORIGINAL, Variant
from compressor.report import VariantResult
from compressor.run_cache import RunCache, cached_note
from compressor.run_request import RunRequest
from compressor.search_limits import TimeUp, certain_violation, deadline
from compressor.search_space import Config, Stage
from compressor.selection import objective_value
from compressor.session import Session
from compressor.worker import MeasuredArtifact

#: Evaluation sets larger than this are first measured on their first half (at least this many).
SUBSET_FROM = 400


@dataclass
class SearchRequest:
    run: RunRequest
    objective: str = "size"
    max_trials: int = 20
    time_budget_seconds: float | None = None
    seed: int = 0
    space: Path | None = None


@dataclass
class Trial:
    number: int
    config: Config
    variant: Variant | None
    state: str = "skipped"
    reason: str = ""
    result: VariantResult | None = None
    artifact: Artifact | None = None
    value: float | None = None
    violation: float = 0.0


@dataclass
class Searcher:
    """One search: the session, the space, the reference measurement and the trials so far."""

    session: Session
    request: SearchRequest
    stages: list[Stage]
    progress: ProgressCallback
    reference: MeasuredArtifact | None = None
    base: dict[str, Any] = field(default_factory=dict)
    #: ``--executor ray``: trials are made and measured on the cluster, a batch at a time.
    executor: RayExecutor | None = None
    trials: list[Trial] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    #: The original measured on the subset a trial is first measured on: (its size, the
    #: measurement, its metrics); see :meth:`reference_for`.
    quick_reference: tuple[int | None, MeasuredArtifact, dict[str, Any]] | None = None
    #: The cache across runs (None: off), opened once the original is made.
    run_cache: RunCache | None = None

    @property
    def deadline(self) -> float | None:
        budget = self.request.time_budget_seconds
        return None if budget is None else self.started + budget

    @property
    def budgets(self) -> dict[str, float | None]:
        return budgets_of(self.session.request)

    def best(self) -> Trial | None:
        """The trial within budget with the smallest objective (the original is not a trial)."""
        feasible = [t for t in self.trials[1:] if t.value is not None and t.violation <= 0]
        return min(feasible, key=lambda t: (t.value, t.number)) if feasible else None

    def made(self) -> int:
        """Trials that cost work (compressed, maybe measured); skipped ones are free."""
        return sum(trial.state != "skipped" for trial in self.trials[1:])

    def ruled_out(self, config: Config) -> Trial | None:
        """A trial that broke the budget and that ``config`` is at least as strict as."""
        for trial in self.trials:
            if trial.violation > 0 and trial.state in ("measured", "stopped early") and (
                    search_space.stricter(config, trial.config)):
                return trial
        return None

    def evaluate(self, trial: Trial) -> None:
        """Make and measure ``trial``'s variant, unless it cannot win."""
        session = self.session
        assert trial.variant is not None
        try:
            validated = session.validate([trial.variant])[0]
        except CompressorError as error:
            trial.state, trial.reason = "failed", error.message
            trial.result = VariantResult(trial.variant.name, [str(s) for s in trial.variant.steps])
            return
        result, artifact = self.make(validated)
        trial.result, trial.artifact = result, artifact
        if artifact is None:
            trial.state, trial.reason = "failed", result.error or "compression failed"
            return
        best = self.best() or self.trials[0]
        size = sum(path.stat().st_size for path in artifact.files if path.is_file())
        if self.request.objective == "size" and best.value is not None and size >= best.value:
            trial.state = "cannot win"
            trial.reason = f"{size} bytes, not smaller than {best.variant.name if best.variant else ORIGINAL}"
            result.metrics["size_bytes"] = size
            return
        settings = session.request.measure
        data = session.context.eval_data
        if data is not None and data.size > SUBSET_FROM and not settings.max_examples:
            seen = max(SUBSET_FROM, data.size // 2)
            quick = replace(settings, max_examples=seen, min_seconds=min(settings.min_seconds, 0.1))
            measured = self._measure(artifact, quick, result.name)
            probe = VariantResult(result.name, result.steps)
            reference, _ = self.reference_for(quick)
            score(probe, [measured], reference, data, quick)
            margin = certain_violation(probe.metrics, seen, data.size, self.base, self.budgets)
            if margin > 0:
                trial.state = "stopped early"
                trial.reason = (f"outside the budget on the first {seen} of {data.size} examples by more "
                                f"than the other {data.size - seen} could make up")
                trial.violation = margin
                result.metrics.update(probe.metrics)
                return
        self._judge(trial, self._measure(artifact, settings, result.name, result.notes))

    def make(self, variant: Variant) -> tuple[VariantResult, Artifact | None]:
        """``variant`` restored from the cache, or made here (and kept in the cache)."""
        session, run_cache = self.session, self.run_cache
        if run_cache is not None:
            hit = run_cache.restore(variant, lambda: session.output.staging_path(variant.name))
            if hit is not None:
                return hit
        result, artifact = session.make(variant)
        if run_cache is not None and artifact is not None:
            run_cache.keep(variant, result, artifact)
        return result, artifact

    def _measure(self, artifact: Artifact, settings: MeasureSettings, name: str,
                 notes: list[str] | None = None) -> MeasuredArtifact:
        """One measurement of variant ``name``'s artifact (from the cache when it holds it,
        said in ``notes``); once the original is measured, with its decisions (each output's
        task, axes, thresholds), as ``compressor run`` measures its variants."""
        session, run_cache = self.session, self.run_cache
        original = session.original
        assert original is not None, "the session is open"
        found = run_cache.measured(name, settings, side_by_side=False) if run_cache is not None else None
        if found is not None:
            if notes is not None and run_cache is not None:
                notes.append(cached_note(run_cache))
            return found
        decided = with_original_tasks(settings, self.reference) if self.reference is not None else settings
        if self.executor is not None:
            outcome = self.executor.measure(replace(session.request, measure=decided),
                                            [made_from(VariantResult("x", []), artifact)], original.inputs)[0]
            if isinstance(outcome, CompressorError):
                raise outcome
            measured = outcome
        else:
            measured = measure_one(session.host, artifact, session.request.data, original.inputs, decided)
        self.keep_measured(name, measured, settings)
        return measured

    def keep_measured(self, name: str, measured: MeasuredArtifact, settings: MeasureSettings) -> None:
        """A measurement taken in this search, kept for the next (see :meth:`RunCache.keep_measured`)."""
        workdir = self.session.context.workdir
        if self.run_cache is not None and workdir is not None:
            self.run_cache.keep_measured(name, measured, workdir, settings, side_by_side=False)

    def evaluate_batch(self, trials: list[Trial]) -> None:
        """Make and measure several trials; on Ray in parallel (no subset early stop there, and
        the time budget is checked between batches). A trial the time budget stops is marked so."""
        if self.executor is None or len(trials) == 1:
            for trial in trials:
                try:
                    with deadline(self.deadline if self.executor is None else None):
                        self.evaluate(trial)
                except TimeUp:
                    trial.state, trial.reason = "stopped", "the time budget ran out during this trial"
                    trial.value, trial.violation = None, 0.0
            return
        self._evaluate_on_ray(trials)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def reference_for(self, settings: MeasureSettings) -> tuple[MeasuredArtifact, dict[str, Any]]:
        """The original measured on a subset as a trial is, and its metrics (cached)."""
        key = settings.max_examples
        cached = self.quick_reference
        if cached is None or cached[0] != key:
            artifact = self.trials[0].artifact
            assert artifact is not None, "the original is made first"
            measured = self._measure(artifact, settings, ORIGINAL)
            original = VariantResult(ORIGINAL, [])
            score(original, [measured], measured, self.session.context.eval_data, settings)
            cached = self.quick_reference = (key, measured, original.metrics)
        return cached[1], cached[2]

    def _evaluate_on_ray(self, trials: list[Trial]) -> None:
        """A batch of trials made and measured on the cluster in parallel (sizes first: a
        variant that cannot win is not measured); what the cache holds is not sent there."""
        session, executor, run_cache = self.session, self.executor, self.run_cache
        assert executor is not None and session.original is not None
        variants = []
        for trial in trials:
            assert trial.variant is not None
            variants.append(session.validate([trial.variant])[0])
        made_here: dict[int, Made] = {}
        to_make = []
        for index, (trial, variant) in enumerate(zip(trials, variants)):
            hit = run_cache.restore(variant, lambda name=variant.name: session.output.staging_path(name)) \
                if run_cache is not None else None
            if hit is None:
                to_make.append(index)
            else:
                trial.result, trial.artifact = hit
        made_list = executor.make(session.request, [variants[index] for index in to_make]) if to_make else []
        for index, made in zip(to_make, made_list):
            trial, variant = trials[index], variants[index]
            if isinstance(made, CompressorError):
                trial.state, trial.reason = "failed", made.message
                trial.result = VariantResult(variant.name, [str(s) for s in variant.steps], error=made.message)
                continue
            trial.result, made_here[index] = made.result, made
            trial.artifact = stage(made, session.output.staging_path(variant.name))
            if run_cache is not None:
                run_cache.keep(variant, made.result, trial.artifact)
        best = self.best() or self.trials[0]
        settings = session.request.measure
        to_measure: list[tuple[Trial, Made]] = []
        for index, trial in enumerate(trials):
            if trial.artifact is None or trial.result is None:
                continue
            size = sum(path.stat().st_size for path in trial.artifact.files)
            if self.request.objective == "size" and best.value is not None and size >= best.value:
                trial.state, trial.reason = "cannot win", f"{size} bytes, not smaller than the best so far"
                trial.result.metrics["size_bytes"] = size
                continue
            found = run_cache.measured(trial.result.name, settings, side_by_side=False) if run_cache else None
            if found is not None and run_cache is not None:
                trial.result.notes.append(cached_note(run_cache))
                self._judge(trial, found)
            else:
                to_measure.append((trial, made_here.get(index) or made_from(trial.result, trial.artifact)))
        assert self.reference is not None, "the original is measured first"
        decided = replace(session.request, measure=with_original_tasks(settings, self.reference))
        outcomes = executor.measure(decided, [made for _, made in to_measure], session.original.inputs) \
            if to_measure else []
        for (trial, _), measured in zip(to_measure, outcomes):
            if isinstance(measured, CompressorError):
                trial.state, trial.reason = "failed", measured.message
                continue
            assert trial.result is not None
            self.keep_measured(trial.result.name, measured, settings)
            self._judge(trial, measured)

    def _judge(self, trial: Trial, measured: MeasuredArtifact) -> None:
        """``trial`` scored against the original, and its objective and distance from the budget."""
        result = trial.result
        assert result is not None
        settings = self.session.request.measure
        score(result, [measured], self.reference, self.session.context.eval_data, settings)
        result.budget_failures = budget_failures(result.metrics, self.base, self.budgets)
        trial.value = objective_value(result, self.request.objective)
        trial.violation = violation(result.metrics, self.base, self.budgets)
