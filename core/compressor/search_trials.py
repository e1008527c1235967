"""A search's trials: what each one is, and how one is made, measured and judged
(:class:`Searcher`); the loop that proposes them is :mod:`compressor.searching`."""

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
from compressor.ray_executor import RayExecutor, made_from, stage
from compressor.recipes import ORIGINAL, Variant
from compressor.report import VariantResult
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
        result, artifact = session.make(validated)
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
            measured = self._measure(artifact, quick)
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
        measured = self._measure(artifact, settings)
        score(result, [measured], self.reference, data, settings)
        result.budget_failures = budget_failures(result.metrics, self.base, self.budgets)
        trial.value = objective_value(result, self.request.objective)
        trial.violation = violation(result.metrics, self.base, self.budgets)

    def _measure(self, artifact: Artifact, settings: MeasureSettings) -> MeasuredArtifact:
        """One measurement; once the original is measured, with its decisions (each output's
        task, axes, thresholds), as ``compressor run`` measures its variants."""
        session = self.session
        original = session.original
        assert original is not None, "the session is open"
        if self.reference is not None:
            settings = with_original_tasks(settings, self.reference)
        if self.executor is not None:
            outcome = self.executor.measure(replace(session.request, measure=settings),
                                            [made_from(VariantResult("x", []), artifact)], original.inputs)[0]
            if isinstance(outcome, CompressorError):
                raise outcome
            return outcome
        return measure_one(session.host, artifact, session.request.data, original.inputs, settings)

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
            measured = self._measure(artifact, settings)
            original = VariantResult(ORIGINAL, [])
            score(original, [measured], measured, self.session.context.eval_data, settings)
            cached = self.quick_reference = (key, measured, original.metrics)
        return cached[1], cached[2]

    def _evaluate_on_ray(self, trials: list[Trial]) -> None:
        """A batch of trials made and measured on the cluster in parallel (sizes first: a
        variant that cannot win is not measured)."""
        session, executor = self.session, self.executor
        assert executor is not None and session.original is not None
        variants = []
        for trial in trials:
            assert trial.variant is not None
            variants.append(session.validate([trial.variant])[0])
        best = self.best() or self.trials[0]
        to_measure = []
        for trial, variant, made in zip(trials, variants, executor.make(session.request, variants)):
            if isinstance(made, CompressorError):
                trial.state, trial.reason = "failed", made.message
                trial.result = VariantResult(variant.name, [str(s) for s in variant.steps], error=made.message)
                continue
            trial.result = made.result
            trial.artifact = stage(made, session.output.staging_path(variant.name))
            size = sum(path.stat().st_size for path in trial.artifact.files)
            if self.request.objective == "size" and best.value is not None and size >= best.value:
                trial.state, trial.reason = "cannot win", f"{size} bytes, not smaller than the best so far"
                made.result.metrics["size_bytes"] = size
                continue
            to_measure.append((trial, made))
        assert self.reference is not None, "the original is measured first"
        decided = replace(session.request, measure=with_original_tasks(session.request.measure, self.reference))
        outcomes = executor.measure(decided, [made for _, made in to_measure], session.original.inputs)
        for (trial, _), measured in zip(to_measure, outcomes):
            if isinstance(measured, CompressorError):
                trial.state, trial.reason = "failed", measured.message
                continue
            result = trial.result
            assert result is not None
            score(result, [measured], self.reference, session.context.eval_data, session.request.measure)
            result.budget_failures = budget_failures(result.metrics, self.base, self.budgets)
            trial.value = objective_value(result, self.request.objective)
            trial.violation = violation(result.metrics, self.base, self.budgets)
