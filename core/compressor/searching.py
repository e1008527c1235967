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
from dataclasses import replace
from typing import Any

from compressor import search_space
from compressor.errors import BudgetError, CompressorError, UnsupportedError
from compressor.evaluation import check_reference, score
from compressor.models import Artifact, ProgressCallback, Step
from compressor.plugins import PluginHost
from compressor.recipes import ORIGINAL, Variant
from compressor.report import Report
from compressor.search_limits import check_limits
from compressor.search_space import Config, Stage
from compressor.search_trials import SUBSET_FROM, Searcher, SearchRequest, Trial
from compressor.selection import objective_value
from compressor.session import Session

__all__ = ["SUBSET_FROM", "SearchRequest", "Searcher", "Trial", "check_limits", "search"]

#: Consecutive proposals of configurations already tried before the space counts as exhausted.
MAX_REPEATS = 25


def search(request: SearchRequest, host: PluginHost, progress: ProgressCallback) -> Report:
    """Run the search; the report has the original and every trial, the winner named in
    ``settings["search"]``. Raises BudgetError (exit 6) when no trial meets the budget."""
    from compressor.cache import check_settings
    from compressor.search_results import check_best_names, no_winner, publish

    started = time.monotonic()
    check_limits(request.max_trials, request.time_budget_seconds)
    check_settings()
    try:
        import optuna
    except ModuleNotFoundError:
        raise UnsupportedError("compressor search needs Optuna: pip install 'compressor[search]'") from None
    opened = Session(request.run, host, progress)
    check_best_names(opened.out, opened.backend.formats)
    opened.progress.plan(2 + request.max_trials)  # loading, the original, each trial
    with opened as session:
        stages = _valid_stages(session, search_space.from_recipe(request.space) if request.space
                               else search_space.from_backend(session.backend))
        searcher = Searcher(session, request, stages, progress, started=started)
        if request.run.executor == "ray":
            from compressor import ray_executor

            searcher.executor = ray_executor.RayExecutor(request.run.ray_address, request.run.measure.threads,
                                                         host.extra_modules, timeout=request.run.ray_timeout)
            session._stack.callback(searcher.executor.close)
        original = _measure_original(searcher)
        check_best_names(session.out, [original.path.suffix])
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


def _valid_stages(session: Session, stages: list[Stage]) -> list[Stage]:
    """Each stage's options that the backend accepts with the data given (others noted and dropped)."""
    valid = []
    for stage in stages:
        options: list[Step | None] = [None]
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


def _measure_original(searcher: Searcher) -> Artifact:
    """Make and measure the original (trial 0, the reference every trial is compared with);
    the cache across runs is opened with it (its measurement may come from there)."""
    from compressor.run_cache import open_any, plugin_identity

    session = searcher.session
    session.progress.begin("original")
    result, artifact = session.make(Variant(ORIGINAL, ()))
    if artifact is None:
        raise CompressorError(f"could not convert the original model: {result.error}")
    searcher.run_cache = open_any(replace(searcher.request.run, measure=session.request.measure),
                                  session.backend, session.options,
                                  plugin_identity(session.host, session.backend.plugin_name), artifact)
    settings = session.request.measure
    reference = searcher.reference = searcher._measure(artifact, settings, ORIGINAL, result.notes)
    if session.request.data is not None:
        check_reference(reference, session.context.eval_data, settings, session.request.data)
    score(result, [reference], reference, session.context.eval_data, settings)
    searcher.base = result.metrics
    searcher.trials.append(Trial(0, tuple(0 for _ in searcher.stages), None, "measured", result=result, artifact=artifact,
                                 value=objective_value(result, searcher.request.objective)))
    return artifact


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


