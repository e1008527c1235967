"""The ``compressor`` command line. Backends and frameworks are imported lazily."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from compressor.cli_techniques import TechniqueCommand, given_techniques
from compressor.clibase import (
    EXIT_CODE_HELP,
    PROGRESS,
    CompressorGroup,
    FiniteFloatRange,
    end_progress,
    handle_termination_signals,
    parse_settings,
    plugin_host,
    progress,
    set_debug,
    set_quiet,
    threads_within_cpus,
)
from compressor.errors import BudgetError, CompressionError
from compressor.models import DEFAULT_MIN_SECONDS, MIN_SECONDS_VARIABLE, MeasureSettings
from compressor.run_request import RunRequest
from compressor.version import __version__

if TYPE_CHECKING:
    from compressor.report import Report


@click.group(cls=CompressorGroup, epilog=EXIT_CODE_HELP)
@click.version_option(__version__, prog_name="compressor")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("--quiet", is_flag=True, help="No progress messages on stderr.")
def cli(debug: bool, quiet: bool) -> None:
    """Compress a trained model several ways and measure what changed.

    Start with `compressor demo`, then `compressor run MODEL --out DIR`.
    """
    PROGRESS["quiet"] = quiet


_path = click.Path(path_type=Path)


def measure_options(function: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.option("--threads", type=click.IntRange(1), default=1, show_default=True,
                     callback=threads_within_cpus, help="Threads for every runtime while measuring (at most the CPUs)."),
        click.option("--repeats", type=click.IntRange(1, 1000), default=1, show_default=True,
                     help="Time every variant this many times, interleaved, medians reported (load time, "
                          "memory and fidelity are measured once)."),
        click.option("--max-examples", type=click.IntRange(1), default=None,
                     help="Evaluate on at most this many examples of --data."),
        click.option("--min-seconds", type=FiniteFloatRange(0, 3600), default=DEFAULT_MIN_SECONDS, show_default=True,
                     envvar=MIN_SECONDS_VARIABLE, show_envvar=True,
                     help="Time each latency measurement for at least this long."),
        click.option("--precision", default="0.03", show_default=True, metavar="FRACTION|off",
                     expose_value=False, callback=_remember_measure_option,
                     help="Time each variant against the original until their latency ratio's 95% interval "
                          "is within +-FRACTION (0.03: +-3%); 0 or off: --min-seconds only."),
        click.option("--max-seconds", default="60", show_default=True, metavar="SECONDS",
                     expose_value=False, callback=_remember_measure_option,
                     help="Time a variant against the original for at most this long."),
    ]):
        function = option(function)
    return function


#: The measuring options kept in the click context (not parameters of each command), by name.
_MEASURE_META = "compressor.measure"


def _remember_measure_option(ctx: click.Context, param: click.Parameter, value: str) -> None:
    """``--precision`` and ``--max-seconds`` checked (a bad value is one line, exit 2) and kept
    for :func:`_settings`."""
    from compressor.latency_interval import parse_max_seconds, parse_precision

    parse = parse_precision if param.name == "precision" else parse_max_seconds
    ctx.meta.setdefault(_MEASURE_META, {})[param.name] = parse(value)


def _settings(threads: int, max_examples: int | None, min_seconds: float) -> MeasureSettings:
    """The measuring settings of a command, ``--precision`` and ``--max-seconds`` included."""
    ctx = click.get_current_context(silent=True)
    kept = ctx.meta.get(_MEASURE_META, {}) if ctx is not None else {}
    return MeasureSettings(threads=threads, max_examples=max_examples, min_seconds=min_seconds, **kept)


@cli.command(cls=TechniqueCommand)
@click.argument("model", type=_path)
@click.option("--out", "-o", type=_path, required=True, help="Folder for artifacts and reports.")
@click.option("--backend", "-b", help="Backend to use (default: recognised from the file); "
              "several, comma-separated, run the same variants on each and compare them.")
@click.option("--set", "set_pairs", multiple=True, metavar="KEY=VALUE",
              help="A technique parameter or backend option, e.g. --set epochs=2.")
@click.option("--recipe", type=_path, help="A TOML recipe of named variants and sweeps.")
@click.option("--max-variants", type=click.IntRange(1), default=1000, show_default=True,
              help="Refuse recipes whose sweeps make more variants than this.")
@click.option("--data", type=_path, help="Labelled evaluation data (.npz, or fastText text).")
@click.option("--train-data", type=_path, help="Training data for fine-tuning / retraining.")
@click.option("--calibration-data", type=_path, help="Calibration data for int8/uint8.")
@click.option("--force", is_flag=True, help="Overwrite files in an existing --out folder.")
@click.option("--trust", is_flag=True,
              help="Allow model formats that execute code when loaded (TorchScript, pickles, Keras Lambda).")
@click.option("--max-accuracy-drop", type=FiniteFloatRange(0, 100), metavar="PT",
              help="Fail (exit 6) if a variant loses more than PT percentage points of accuracy.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Make and measure here, or on Ray (needs compressor[ray]).")
@click.option("--ray-address", metavar="ADDRESS",
              help="An existing Ray cluster (auto, host:6379, ray://host:10001); default: start a local one.")
@click.option("--ray-timeout", type=FiniteFloatRange(0, 3600, min_open=True), default=30, show_default=True,
              metavar="SECONDS", help="Give up reaching --ray-address after this long (exit 2).")
@click.option("--no-space-check", is_flag=True,
              help="Start even if the artifacts look too big for the free disk space.")
@click.option("--min-cosine", type=FiniteFloatRange(-1, 1), metavar="C",
              help="Fail (exit 6) if a variant's outputs have a mean cosine similarity below C.")
@click.option("--min-agreement", type=FiniteFloatRange(0, 1), metavar="FRACTION",
              help="Fail (exit 6) if a variant agrees with the original on fewer inputs.")
@measure_options
def run(model: Path, out: Path, backend: str | None, set_pairs: tuple[str, ...], recipe: Path | None,
        max_variants: int,
        data: Path | None,
        train_data: Path | None, calibration_data: Path | None, force: bool, trust: bool,
        max_accuracy_drop: float | None, executor: str, ray_address: str | None, ray_timeout: float,
        no_space_check: bool,
        min_cosine: float | None,
        min_agreement: float | None,
        threads: int, repeats: int, max_examples: int | None, min_seconds: float) -> None:
    """Compress MODEL into variants, measure each against the original, report.

    \b
    Examples:
      compressor run model.onnx -q dynamic -q int8 --calibration-data cal.npz --data test.npz -o out
      compressor run model.keras --prune 0.8 -q int8 --train-data train.npz --calibration-data cal.npz -o out
      compressor run model.bin --pq --set cutoff=100000 --set retrain=true --train-data train.txt -o out
      compressor run model.keras --recipe study.toml --data test.npz -o out
    """
    from compressor.recipes import load_recipe, unique, variants_from_flags

    flagged = variants_from_flags(given_techniques(click.get_current_context()))
    variants = (load_recipe(recipe, max_variants) if recipe else []) + flagged
    request = RunRequest(
        model=model, out=out, backend=backend, variants=unique(variants),
        settings=parse_settings(set_pairs), data=data, train_data=train_data,
        calibration_data=calibration_data, force=force, trust=trust,
        measure=_settings(threads, max_examples, min_seconds), repeats=repeats,
        max_accuracy_drop=max_accuracy_drop, min_agreement=min_agreement, min_cosine=min_cosine,
        check_space=not no_space_check, executor=executor, ray_address=ray_address,
        ray_timeout=ray_timeout,
    )
    _run_and_print(request, out)


def _run_and_print(request: RunRequest, out: Path | None) -> Report:
    from compressor.multirun import run_many
    from compressor.plugins import print_warnings
    from compressor.report import render_table
    from compressor.runner import run_outcome

    host = plugin_host()
    backends = [name.strip() for name in (request.backend or "").split(",") if name.strip()]
    try:
        if len(backends) > 1:
            outcome = run_many(request, backends, host, progress)
        else:
            outcome = run_outcome(request, host, progress)
    finally:
        end_progress()
        print_warnings(host)
        host.warnings.clear()
    report = outcome.report
    click.echo(render_table(report))
    if out is not None:
        click.echo(f"\nwrote {out}/: {written(out)}")
    if report.failed_budget:
        raise BudgetError("a variant is outside the budget (marked ! above)")
    if report.failed_variants:
        names = ", ".join(v.name for v in report.failed_variants)
        error = CompressionError(f"variant(s) failed: {names}")
        error.plugin_tracebacks = [f"variant {failure.variant!r}: {failure.traceback}" for failure in outcome.failures]
        raise error
    return report


def written(out: Path) -> str:
    """What a run put into ``out``, as the closing line says it: ``report.png`` only when it
    was drawn, else why not (matplotlib missing, or nothing to plot)."""
    from importlib.util import find_spec

    written = "artifacts, report.json, report.md, report.html"
    if (out / "report.png").is_file():
        return f"{written}, report.png"
    why = ("matplotlib is not installed: pip install matplotlib" if find_spec("matplotlib") is None
           else "nothing to plot: no variant has both a size and an accuracy, agreement or cosine")
    return f"{written}; no report.png ({why})"


@cli.command()
@click.argument("model", type=_path)
@click.option("--backend", "-b", help="Backend to use (default: recognised from the file).")
@click.option("--data", type=_path, help="Labelled evaluation data.")
@click.option("--set", "set_pairs", multiple=True, metavar="KEY=VALUE", help="A backend option.")
@click.option("--trust", is_flag=True, help="Allow formats that execute code when loaded.")
@click.option("--out", "-o", type=_path, help="Keep the converted model and reports here.")
@click.option("--force", is_flag=True, help="Overwrite files in an existing --out folder.")
@measure_options
def measure(model: Path, backend: str | None, data: Path | None, set_pairs: tuple[str, ...],
            trust: bool, out: Path | None, force: bool, threads: int, repeats: int,
            max_examples: int | None, min_seconds: float) -> None:
    """Measure MODEL as it is: size, load time, latency, peak RAM, accuracy."""
    from compressor.scratch import MEASURE, scratch_folder

    with scratch_folder(MEASURE) as scratch:
        request = RunRequest(
            model=model, out=out or scratch / "out", backend=backend, variants=(),
            settings=parse_settings(set_pairs), data=data, force=force, trust=trust,
            measure=_settings(threads, max_examples, min_seconds), repeats=repeats,
            original_only=True,
        )
        _run_and_print(request, out)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--check", is_flag=True, help="Also import each installed backend's framework to check it works.")
def backends(as_json: bool, check: bool) -> None:
    """List backends, their techniques and formats, and whether they are installed."""
    host = plugin_host()
    rows = []
    for backend in host.backends().values():
        missing = backend.missing_modules()
        rows.append({
            "name": backend.name,
            "description": backend.description,
            "plugin": backend.plugin_name,
            "installed": not missing,
            "broken": None if missing else backend.broken_reason(deep=check),
            "missing": missing,
            "install": backend.install_hint(),
            "formats": list(backend.formats),
            "techniques": {
                name: {"modes": list(t.modes), "params": sorted(t.params)}
                for name, t in backend.techniques.items()
            },
            "options": sorted(backend.options),
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        state = "installed" if row["installed"] else (
            f"not installed (missing {', '.join(row['missing'])}: {row['install']})"
        )
        if row["broken"]:
            state = f"installed but broken: {row['broken']}"
        click.echo(f"{row['name']}: {row['description']} [{state}]")
        click.echo(f"  formats:    {', '.join(row['formats'])}")
        techniques = [
            f"{name} ({', '.join(t['modes'])})" if t["modes"] else name
            for name, t in row["techniques"].items()
        ]
        click.echo(f"  techniques: {'; '.join(techniques)}")
        if row["options"]:
            click.echo(f"  options:    {', '.join(row['options'])}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List installed plugins, their versions and the hooks they implement."""
    from dataclasses import asdict

    host = plugin_host()
    infos = [asdict(info) for info in host.plugins()]
    if as_json:
        click.echo(json.dumps(infos, indent=2))
        return
    for info in infos:
        version = f"{info['distribution']} {info['version']}" if info["distribution"] else "in-process"
        click.echo(f"{info['name']} ({version}): {', '.join(info['hooks'])}")


@cli.command()
@click.option("--out", "-o", type=_path, help="Keep the sample models, artifacts and reports here.")
@click.option("--backend", "-b", "only", multiple=True, help="Only these backends.")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True)
def demo(out: Path | None, only: tuple[str, ...], threads: int) -> None:
    """Compress a small sample model with every installed backend, side by side."""
    from compressor.demo import run_demo

    run_demo(plugin_host(), out, only, MeasureSettings(threads=threads, min_seconds=0.2), progress,
             end_progress, click.echo)


def _register_compare() -> None:
    from compressor.data_cli import data
    from compressor.merging import compare
    from compressor.search_cli import search

    cli.add_command(compare)
    cli.add_command(search)
    cli.add_command(data)


_register_compare()
from compressor.cli_cache import register as register_cache  # noqa: E402 - extends run, defined above

register_cache(cli)


def _add_common_options() -> None:
    """``--debug`` and ``--quiet`` after any subcommand too (``compressor run ... --debug``)."""
    for command in cli.commands.values():
        command.params += [
            click.Option(["--debug"], is_flag=True, expose_value=False, is_eager=True,
                         callback=set_debug, help="Show full tracebacks instead of one-line errors."),
            click.Option(["--quiet"], is_flag=True, expose_value=False, is_eager=True,
                         callback=set_quiet, help="No progress messages on stderr."),
        ]


_add_common_options()


def main() -> None:
    handle_termination_signals()
    cli(prog_name="compressor")
