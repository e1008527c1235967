"""``compressor search``: the smallest, fastest or leanest variant within a fidelity budget.

Optuna proposes configurations (one option per stage of the space, see
:mod:`compressor.search_space`); compressor supplies the space, the cost order
and the objective, and skips work that cannot win:

1. a configuration at least as strict in every stage as one that broke the
   budget is not tried (it is recorded as skipped);
2. a configuration already tried is not tried again;
3. for ``--objective size``, a variant whose file is not smaller than the best
   one within budget is not measured (size is known before measuring);
4. with more than :data:`SUBSET_FROM` evaluation examples, a variant is first
   measured on the first half of them (at least :data:`SUBSET_FROM`), and stopped
   there only when it would miss the budget even if every example not yet seen
   agreed (:func:`compressor.search_limits.certain_violation`).

The search starts with each stage's options alone, mildest first, so the
first step that breaks the budget rules out everything stricter in its stage;
then Optuna's TPE sampler (seeded: the same seed gives the same trials) learns
from each measured trial, with the budget as a constraint, and proposes the
combinations. The search stops after ``--max-trials``
tries, ``--time-budget`` minutes (the trial under way is stopped, see
:mod:`compressor.search_limits`), or when every configuration is tried or
ruled out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from compressor import search_space
from compressor.errors import BudgetError, CompressorError, UnsupportedError
from compressor.evaluation import (
    budget_failures,
    check_reference,
    measure_one,
    score,
    with_original_tasks,
)
from compressor.models import Artifact, ProgressCallback
from compressor.recipes import ORIGINAL, Variant
from compressor.report import Report, VariantResult
from compressor.search_limits import TimeUp, certain_violation, check_limits, deadline
from compressor.search_space import Config, Stage
from compressor.selection import objective_value

__all__ = ["SearchRequest", "check_limits", "search"]

#: Evaluation sets larger than this are first measured on their first half (at least this many).
SUBSET_FROM = 400
#: Consecutive proposals of configurations already tried before the space counts as exhausted.
MAX_REPEATS = 25


@dataclass
class SearchRequest:
    run: Any
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

    session: Any
    request: SearchRequest
    stages: list[Stage]
    progress: ProgressCallback
    reference: Any = None
    base: dict[str, Any] = field(default_factory=dict)
    #: ``--executor ray``: trials are made and measured on the cluster, a batch at a time.
    executor: Any = None
    trials: list[Trial] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def deadline(self) -> float | None:
        budget = self.request.time_budget_seconds
        return None if budget is None else self.started + budget

    @property
    def budgets(self) -> dict[str, Any]:
        from compressor.session import budgets_of

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
        trial.violation = _violation(result.metrics, self.base, self.budgets)

    def _measure(self, artifact: Artifact, settings: Any) -> Any:
        """One measurement; once the original is measured, with its decisions (each output's
        task, axes, thresholds), as ``compressor run`` measures its variants."""
        session = self.session
        original = session.original
        if self.reference is not None:
            settings = with_original_tasks(settings, self.reference)
        if self.executor is not None:
            from compressor.ray_executor import made_from

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
        from compressor.ray_executor import evaluate_trials

        evaluate_trials(self, trials)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def reference_for(self, settings: Any) -> tuple[Any, dict[str, Any]]:
        """The original measured on a subset as a trial is, and its metrics (cached)."""
        key = settings.max_examples
        cached = getattr(self, "_quick_reference", None)
        if cached is None or cached[0] != key:
            measured = self._measure(self.trials[0].artifact, settings)
            original = VariantResult(ORIGINAL, [])
            score(original, [measured], measured, self.session.context.eval_data, settings)
            cached = (key, measured, original.metrics)
            self._quick_reference = cached
        return cached[1], cached[2]


def _violation(metrics: dict[str, Any], base: dict[str, Any], budgets: dict[str, Any]) -> float:
    """How far outside the budget (0 or less: inside), as a share (1 pt of accuracy = 0.01)."""
    worst = 0.0
    accuracy, base_accuracy = metrics.get("accuracy"), base.get("accuracy")
    if budgets.get("max_accuracy_drop") is not None and accuracy is not None and base_accuracy is not None:
        worst = max(worst, (base_accuracy - accuracy) - budgets["max_accuracy_drop"] / 100)
    if budgets.get("min_agreement") is not None and metrics.get("agreement") is not None:
        worst = max(worst, budgets["min_agreement"] - metrics["agreement"])
    cosine = (metrics.get("cosine") or {}).get("mean")
    if budgets.get("min_cosine") is not None and cosine is not None:
        worst = max(worst, budgets["min_cosine"] - cosine)
    if any(budgets.get(k) is not None for k in ("max_accuracy_drop", "min_agreement", "min_cosine")) and not any(
            key in metrics for key in ("accuracy", "agreement", "cosine")):
        worst = max(worst, 1.0)
    return worst


def search(request: SearchRequest, host: Any, progress: ProgressCallback) -> Report:
    """Run the search; the report has the original and every trial, the winner named in
    ``settings["search"]``. Raises BudgetError (exit 6) when no trial meets the budget."""
    from compressor.search_results import check_best_names, no_winner, publish

    started = time.monotonic()
    check_limits(request.max_trials, request.time_budget_seconds)
    try:
        import optuna
    except ModuleNotFoundError:
        raise UnsupportedError("compressor search needs Optuna: pip install 'compressor[search]'") from None
    from compressor.session import Session

    opened = Session(request.run, host, progress)
    check_best_names(opened.out, opened.backend.formats)
    opened.progress.plan(2 + request.max_trials)  # loading, the original, each trial
    with opened as session:
        stages = _valid_stages(session, search_space.from_recipe(request.space) if request.space
                               else search_space.from_backend(session.backend))
        searcher = Searcher(session, request, stages, progress, started=started)
        if request.run.executor == "ray":
            from compressor.ray_executor import RayExecutor

            searcher.executor = RayExecutor(request.run.ray_address, request.run.measure.threads,
                                            host.extra_modules, timeout=request.run.ray_timeout)
            session._stack.callback(searcher.executor.close)
        _measure_original(searcher)
        check_best_names(session.out, [searcher.trials[0].artifact.path.suffix])
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(
            seed=request.seed, n_startup_trials=min(5, max(1, request.max_trials // 4)))
        study = optuna.create_study(direction="minimize", sampler=sampler)
        for config in _one_at_a_time(searcher.stages):
            study.enqueue_trial({stage.name: index for stage, index in zip(searcher.stages, config)})
        _loop(searcher, study, optuna)
        report = publish(searcher)
    opened.progress.finish()
    if searcher.best() is None:
        raise BudgetError(no_winner(searcher))
    return report


def _one_at_a_time(stages: list[Stage]) -> list[Config]:
    """Each stage's options alone, mildest first, the last stage (quantization) first: they
    show Optuna each step's effect, and once one breaks the budget the stricter ones in its
    stage (and every combination with them) are ruled out without being tried."""
    configs = []
    for position in reversed(range(len(stages))):
        for option in range(1, len(stages[position].options)):
            configs.append(tuple(option if index == position else 0 for index in range(len(stages))))
    return configs


def _valid_stages(session: Any, stages: list[Stage]) -> list[Stage]:
    """Each stage's options that the backend accepts with the data given (others noted and dropped)."""
    valid = []
    for stage in stages:
        options = [None]
        for step in stage.options[1:]:
            assert step is not None
            try:
                session.validate([Variant("candidate", (step,))])
                options.append(step)
            except CompressorError as error:
                session.progress(f"search: skipping '{step}': {error.message}", None)
        if len(options) > 1:
            valid.append(Stage(stage.name, tuple(options), stage.technique))
    if not valid:
        raise UnsupportedError("nothing in the search space can run with this backend and data")
    return valid


def _measure_original(searcher: Searcher) -> None:
    session = searcher.session
    session.progress.begin("original")
    result, artifact = session.make(Variant(ORIGINAL, ()))
    if artifact is None:
        raise CompressorError(f"could not convert the original model: {result.error}")
    settings = session.request.measure
    searcher.reference = searcher._measure(artifact, settings)
    if session.request.data is not None:
        check_reference(searcher.reference, session.context.eval_data, settings, session.request.data)
    score(result, [searcher.reference], searcher.reference, session.context.eval_data, settings)
    searcher.base = result.metrics
    searcher.trials.append(Trial(0, tuple(0 for _ in searcher.stages), None, "measured", result=result, artifact=artifact,
                                 value=objective_value(result, searcher.request.objective)))


def _loop(searcher: Searcher, study: Any, optuna: Any) -> None:
    request, stages = searcher.request, searcher.stages
    seen = {searcher.trials[0].config: searcher.trials[0]}
    made: dict[str, Trial] = {}
    repeats = 0
    total = search_space.size(stages)
    batch_size = max(1, searcher.executor.measuring_slots) if searcher.executor is not None else 1
    while searcher.made() < request.max_trials and len(seen) < total:
        if searcher.out_of_time():
            break
        batch: list[tuple[Any, Trial]] = []
        while len(batch) < min(batch_size, request.max_trials - searcher.made()) and len(seen) < total:
            proposal = study.ask()
            config = tuple(proposal.suggest_categorical(stage.name, list(range(len(stage.options))))
                           for stage in stages)
            twin = seen.get(config)
            trial = None
            if twin is None:
                trial = Trial(len(searcher.trials), config, search_space.variant(config, stages))
                seen[config] = trial
                twin = made.get(trial.variant.name) if trial.variant is not None else searcher.trials[0]
            if twin is not None:  # already tried, or another configuration making the same variant
                study.tell(proposal, twin.value, state=None if twin.value is not None
                           else optuna.trial.TrialState.PRUNED)
                repeats += 1
                if repeats >= MAX_REPEATS:
                    break
                continue
            repeats = 0
            assert trial is not None and trial.variant is not None
            made[trial.variant.name] = trial
            searcher.trials.append(trial)
            blocker = searcher.ruled_out(config)
            if blocker is not None:
                trial.reason = (f"at least as strict as {blocker.variant.name if blocker.variant else ORIGINAL}, "
                                "which broke the budget")
                _tell(study, proposal, trial, optuna)
                continue
            trial.state = "measured"
            batch.append((proposal, trial))
        if not batch:
            if repeats >= MAX_REPEATS:
                break
            continue
        _progress(searcher, batch[0][1], len(batch))
        searcher.evaluate_batch([trial for _, trial in batch])
        for proposal, trial in batch:
            _tell(study, proposal, trial, optuna)


def _tell(study: Any, proposal: Any, trial: Trial, optuna: Any) -> None:
    proposal.set_constraint("budget", trial.violation)
    if trial.value is not None:
        study.tell(proposal, trial.value)
    else:
        study.tell(proposal, state=optuna.trial.TrialState.PRUNED)


def _progress(searcher: Searcher, trial: Trial, count: int = 1) -> None:
    """A trial (``count`` of them on Ray) starts: a unit of the search's progress each."""
    best = searcher.best()
    best_text = f"best so far {best.variant.name if best and best.variant else ORIGINAL}" if best else "none yet"
    elapsed = time.monotonic() - searcher.started
    last = searcher.made()  # counts the trials starting now
    which = f"trial {last}" if count == 1 else f"trials {last - count + 1}-{last}"
    searcher.session.progress.begin(
        f"{which} of at most {searcher.request.max_trials}: "
        f"{trial.variant.name if trial.variant else ORIGINAL}; {best_text}; {elapsed:.0f} s", units=count)


