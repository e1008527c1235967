"""What a search leaves in ``--out``: the report of every trial, the winner's ``best.<ext>``
and ``recipe.toml``, published together with the kept artifacts, all or nothing.

``best.<ext>`` is a hard link (or, where the filesystem has none, a copy) of the winner's
artifact, made in staging; a ``best.*`` with the suffix of an artifact this run made, or a
``recipe.toml``, that this run does not replace (no winner, or a winner of another format) belongs to an earlier
search and is removed, so that ``--out`` never names a winner the report does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from compressor import search_space
from compressor.errors import UsageError
from compressor.recipes import ORIGINAL
from compressor.report import Report, VariantResult
from compressor.run_request import RunRequest
from compressor.search_trials import Searcher, Trial

RECIPE = "recipe.toml"


def check_best_names(out: Path, formats: Sequence[str]) -> None:
    """Before any work: a folder where ``best.<ext>`` goes would fail the search at its end."""
    for suffix in formats:
        target = out / f"best{suffix}"
        if suffix.startswith(".") and target.is_dir() and not target.is_symlink():
            raise UsageError(f"--out holds a folder named {target.name!r}, where the winner goes; "
                             "remove it or choose another --out", out)


def no_winner(searcher: Searcher) -> str:
    closest = min((t for t in searcher.trials[1:] if t.state in ("measured", "stopped early")
                   and t.violation > 0), key=lambda t: t.violation, default=None)
    name = (f"{closest.variant.name} ({closest.state}, {closest.violation:.3f} outside)"
            if closest is not None and closest.variant else "none: every trial failed or was skipped")
    timed_out = " before the time budget ran out" if searcher.out_of_time() else ""
    return f"no trial meets the budget{timed_out}; the closest is {name}"


def publish(searcher: Searcher) -> Report:
    """The search's report, published with the kept artifacts, ``best.<ext>`` and ``recipe.toml``."""
    session = searcher.session
    report = _report(searcher)
    winner = searcher.best()
    kept = [t.artifact for t in searcher.trials if t.artifact is not None and _keep(t, winner)]
    texts: dict[str, str] = {}
    copies: dict[str, Path] = {}
    if winner is not None and winner.variant is not None and winner.artifact is not None:
        texts[RECIPE] = _recipe(winner, session.request)
        if winner.artifact.path.is_file():
            copies[f"best{winner.artifact.path.suffix}"] = winner.artifact.path
    # Only suffixes this run's artifacts have: a user's best.keras beside a tflite search is not ours.
    suffixes = {t.artifact.path.suffix for t in searcher.trials if t.artifact}
    owned = [*(f"best{suffix}" for suffix in sorted(suffixes) if suffix.startswith(".")), RECIPE]
    session.publish(report, kept, texts, copies, [name for name in owned if name not in texts and name not in copies])
    return report


def _keep(trial: Trial, winner: Trial | None) -> bool:
    """Artifacts kept in --out: the original, the winner and every measured trial within budget."""
    return trial.number == 0 or trial is winner or (trial.state == "measured" and trial.violation <= 0)


def _report(searcher: Searcher) -> Report:
    results = []
    winner = searcher.best()
    for trial in searcher.trials:
        result = trial.result or VariantResult(trial.variant.name if trial.variant else ORIGINAL,
                                               [str(s) for s in trial.variant.steps] if trial.variant else [])
        result.metadata["search"] = {"trial": trial.number, "state": trial.state,
                                     "reason": trial.reason, "winner": trial is winner}
        if trial.state != "measured" and trial.number:
            result.notes.append(f"{trial.state}: {trial.reason}")
            result.artifact = result.artifact if _keep(trial, winner) else None
        results.append(result)
    summary = {"objective": searcher.request.objective, "seed": searcher.request.seed,
               "max_trials": searcher.request.max_trials, "space_size": search_space.size(searcher.stages),
               "tried": searcher.made(), "skipped": len(searcher.trials) - 1 - searcher.made(),
               "measured": sum(t.state == "measured" for t in searcher.trials[1:]),
               "winner": winner.result.name if winner and winner.result else None,
               # What the cache across runs spared (None: it was off): artifacts not made again,
               # measurements not taken again.
               "reused": dict(searcher.run_cache.reused) if searcher.run_cache is not None else None,
               "stages": {stage.name: ["none" if s is None else str(s) for s in stage.options]
                          for stage in searcher.stages}}
    return searcher.session.report(results, search=summary)


def _recipe(winner: Trial, run: RunRequest) -> str:
    """The winner as a recipe that reproduces it (:func:`compressor.recipes.recipe_text`)."""
    import shlex

    from compressor.recipes import recipe_text

    assert winner.variant is not None
    settings = "".join(f" --set {shlex.quote(f'{key}={value}')}" for key, value in run.settings.items())
    return recipe_text([winner.variant], "The winner of compressor search; make it again with:\n"
                                         f"compressor run MODEL --recipe recipe.toml{settings}")
