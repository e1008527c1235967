"""``compressor search``: the command line of :mod:`compressor.searching`."""

from __future__ import annotations

from pathlib import Path

import click

from compressor.clibase import (
    FiniteFloatRange,
    end_progress,
    parse_settings,
    plugin_host,
    progress,
    threads_within_cpus,
)
from compressor.models import DEFAULT_MIN_SECONDS, MIN_SECONDS_VARIABLE, MeasureSettings
from compressor.selection import OBJECTIVES

_path = click.Path(path_type=Path)


@click.command()
@click.argument("model", type=_path)
@click.option("--out", "-o", type=_path, required=True, help="Folder for the trials, best.<ext>, recipe.toml, reports.")
@click.option("--data", type=_path, required=True, help="Labelled evaluation data.")
@click.option("--objective", type=click.Choice(OBJECTIVES), default="size", show_default=True,
              help="What the winner has least of.")
@click.option("--backend", "-b", help="Backend to use (default: recognised from the file).")
@click.option("--max-accuracy-drop", type=FiniteFloatRange(0, 100), metavar="PT",
              help="Budget: at most PT percentage points of accuracy lost.")
@click.option("--min-agreement", type=FiniteFloatRange(0, 1), metavar="FRACTION",
              help="Budget: agree with the original on at least this share of examples.")
@click.option("--min-cosine", type=FiniteFloatRange(-1, 1), metavar="C",
              help="Budget: outputs at least this cosine-similar to the original's.")
@click.option("--max-trials", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="Try at most this many configurations.")
@click.option("--time-budget", type=FiniteFloatRange(0, min_open=True), metavar="MIN",
              help="Stop after this many minutes (the trial under way is stopped).")
@click.option("--seed", type=int, default=0, show_default=True, help="The same seed gives the same trials.")
@click.option("--space", type=_path, help="A recipe with a [search.stages] table (default: the backend's).")
@click.option("--train-data", type=_path, help="Training data, for steps that fine-tune or retrain.")
@click.option("--calibration-data", type=_path, help="Calibration data, for static int8.")
@click.option("--set", "set_pairs", multiple=True, metavar="KEY=VALUE", help="A backend option or parameter.")
@click.option("--trust", is_flag=True, help="Allow model formats that execute code when loaded.")
@click.option("--force", is_flag=True, help="Overwrite files in an existing --out folder.")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True, callback=threads_within_cpus,
              help="Threads for every runtime while measuring.")
@click.option("--min-seconds", type=FiniteFloatRange(0, 3600), default=DEFAULT_MIN_SECONDS, show_default=True,
              envvar=MIN_SECONDS_VARIABLE, show_envvar=True, help="Time each latency measurement for at least this long.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Make and measure trials here, or on Ray (a batch per round, one measurement per node).")
@click.option("--ray-address", metavar="ADDRESS", help="An existing Ray cluster; default: start a local one.")
@click.option("--ray-timeout", type=FiniteFloatRange(0, 3600, min_open=True), default=30, show_default=True,
              metavar="SECONDS", help="Give up reaching --ray-address after this long (exit 2).")
def search(model: Path, out: Path, data: Path, objective: str, backend: str | None,
           max_accuracy_drop: float | None, min_agreement: float | None, min_cosine: float | None,
           max_trials: int, time_budget: float | None, seed: int, space: Path | None,
           train_data: Path | None, calibration_data: Path | None, set_pairs: tuple[str, ...],
           trust: bool, force: bool, threads: int, min_seconds: float, executor: str,
           ray_address: str | None, ray_timeout: float) -> None:
    """Find the smallest (or fastest, or leanest) variant of MODEL within a budget.

    \b
    Examples:
      compressor search model.onnx --data test.npz --max-accuracy-drop 1 -o search
      compressor search model.bin --data test.txt --train-data train.txt --objective size \\
          --max-accuracy-drop 0.5 --max-trials 30 -o search
    """
    from compressor.report import render_table
    from compressor.run_request import RunRequest
    from compressor.searching import SearchRequest
    from compressor.searching import search as run_search

    run = RunRequest(
        model=model, out=out, backend=backend, settings=parse_settings(set_pairs), data=data,
        train_data=train_data, calibration_data=calibration_data, force=force, trust=trust,
        measure=MeasureSettings(threads=threads, min_seconds=min_seconds),
        max_accuracy_drop=max_accuracy_drop, min_agreement=min_agreement, min_cosine=min_cosine,
        executor=executor, ray_address=ray_address, ray_timeout=ray_timeout,
    )
    request = SearchRequest(run, objective, max_trials, time_budget * 60 if time_budget else None, seed, space)
    try:
        report = run_search(request, plugin_host(), progress)
    finally:
        end_progress()
    click.echo(render_table(report))
    summary = report.settings.get("search", {})
    reused = summary.get("reused")
    cached = (f"; from the cache: {reused['artifacts']} artifacts, {reused['measurements']} measurements"
              if reused and any(reused.values()) else "")
    click.echo(f"\n{summary.get('tried')} trials ({summary.get('measured')} measured) of "
               f"{summary.get('space_size')} configurations; winner: {summary.get('winner')}{cached}")
    click.echo(f"wrote {out}/: best.*, recipe.toml, report.json, report.md, report.html")
