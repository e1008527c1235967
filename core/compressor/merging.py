"""``compressor compare``: the reports of several runs, from any backends, as one comparison.

Each run's variants are renamed ``<backend>:<name>`` (``<folder>:<name>`` when
two runs share a backend) and remember their run in ``metadata["source"]``
(report path, model, backend, environment, settings, budgets). The first
report's original stays first, so "smaller" is relative to it.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import click

from compressor.charts import write_png
from compressor.errors import InvalidInputError, UsageError, first_line
from compressor.html_report import render_html
from compressor.outputs import OutputFolder
from compressor.report import REPORT_VERSION, Report, VariantResult, render_markdown, render_table

REPORT_FILE = "report.json"
_MISSING = object()


def report_file(path: Path) -> Path:
    """``path`` itself, or the ``report.json`` inside it when it is a folder."""
    if path.is_dir():
        found = path / REPORT_FILE
        if not found.is_file():
            raise InvalidInputError(f"no {REPORT_FILE} in this folder", path)
        return found
    if not path.exists():
        raise InvalidInputError("no such file or folder", path)
    return path


def load_report(path: Path) -> Report:
    """Read a ``report.json`` (or the one in folder ``path``), refusing anything else clearly."""
    file = report_file(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InvalidInputError(
            f"not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})", file
        ) from None
    except UnicodeDecodeError:
        raise InvalidInputError("not valid JSON: not UTF-8 text", file) from None
    except RecursionError:
        raise InvalidInputError("not valid JSON: nested too deeply", file) from None
    except OSError as error:
        raise InvalidInputError(f"cannot read it: {error.strerror}", file) from None
    if not isinstance(data, dict) or "variants" not in data:
        raise InvalidInputError("not a compressor report.json (no variants)", file)
    version = data.get("report_version")
    if version != REPORT_VERSION:
        raise InvalidInputError(
            f"report_version {version!r} is not supported; this compressor reads version "
            f"{REPORT_VERSION}", file,
        )
    problem = _shape_problem(data)
    if problem:
        raise InvalidInputError(f"not a compressor report.json: {problem}", file)
    try:
        report = Report.from_json(data)
        # Every format must render: a value of the wrong type is this file's fault, named now.
        render_table(report)
        render_markdown(report)
        render_html(report)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as error:
        raise InvalidInputError(
            f"not a compressor report.json: {type(error).__name__}: {first_line(error)}", file
        ) from None
    return report


def _shape_problem(data: Mapping[str, Any]) -> str | None:
    for key in ("model", "backend", "created"):
        if not isinstance(data.get(key), str):
            return f"{key!r} is missing or not a string"
    for key in ("settings", "environment", "budgets"):
        if not isinstance(data.get(key, {}), dict):
            return f"{key!r} is not an object"
    variants = data["variants"]
    if not isinstance(variants, list) or not variants:
        return "'variants' is not a non-empty list"
    for position, variant in enumerate(variants):
        if not isinstance(variant, dict) or not isinstance(variant.get("name"), str):
            return f"variant {position} has no name"
        if not isinstance(variant.get("steps"), list):
            return f"variant {variant['name']!r} has no list of steps"
        for key in ("metrics", "metadata"):
            if not isinstance(variant.get(key, {}), dict):
                return f"{key!r} of variant {variant['name']!r} is not an object"
    return None


@dataclass
class Merged:
    """Several runs' reports merged: the report, and why its runs are of unrelated models (if so)."""

    report: Report
    #: The runs measured different models: what ``compare`` warns about (also the first variant's note).
    unrelated: str | None = None


def merge_reports(paths: Sequence[Path]) -> Report:
    """One report holding every variant of every run, originals included, first run first."""
    return merge(paths).report


def merge(paths: Sequence[Path]) -> Merged:
    """:func:`merge_reports`, with the warning when the runs are of different models."""
    if not paths:
        raise UsageError(f"give at least one {REPORT_FILE} or a folder holding one")
    files = [report_file(Path(path)) for path in paths]
    seen: set[Path] = set()
    for file in files:
        if file.resolve() in seen:
            raise UsageError("this report is given twice", file)
        seen.add(file.resolve())
    reports = [load_report(file) for file in files]
    if len(reports) == 1:
        return Merged(reports[0])
    variants = [
        _from_run(variant, prefix, file, report)
        for file, report, prefix in zip(files, reports, _prefixes(files, reports), strict=True)
        for variant in report.variants
    ]
    from compressor.model_identity import warning

    merged = Report(
        model=_joined((r.model for r in reports), ", "),
        backend=_joined((r.backend for r in reports), "+"),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        variants=variants,
        settings=_common([r.settings for r in reports]),
        environment=_common([r.environment for r in reports]),
        budgets=_common([r.budgets for r in reports]),
    )
    # Runs of different models: said in the report, and by ``compare`` on stderr.
    unrelated = warning(reports)
    if unrelated:
        variants[0].notes = [*variants[0].notes, unrelated]
    return Merged(merged, unrelated)


def _prefixes(files: Sequence[Path], reports: Sequence[Report]) -> list[str]:
    """The backend name, or the run's folder name when two runs share a backend."""
    backends = Counter(report.backend for report in reports)
    wanted = [
        report.backend if backends[report.backend] == 1 else (file.resolve().parent.name or report.backend)
        for file, report in zip(files, reports, strict=True)
    ]
    counts, numbered, prefixes = Counter(wanted), Counter[str](), []
    for prefix in wanted:
        if counts[prefix] > 1:
            numbered[prefix] += 1
            prefix = f"{prefix}#{numbered[prefix]}"
        prefixes.append(prefix)
    return prefixes


def _from_run(variant: VariantResult, prefix: str, file: Path, report: Report) -> VariantResult:
    source = {
        "prefix": prefix,
        "report": str(file),
        "variant": variant.name,
        "model": report.model,
        "backend": report.backend,
        "created": report.created,
        "environment": report.environment,
        "settings": report.settings,
        "budgets": report.budgets,
    }
    return replace(
        variant,
        name=f"{prefix}:{variant.name}",
        artifact=str(file.parent / variant.artifact) if variant.artifact else None,
        metadata={**variant.metadata, "source": source},
    )


def _joined(values: Iterable[str], separator: str) -> str:
    return separator.join(dict.fromkeys(values))


def _common(mappings: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The entries every mapping agrees on; nested mappings are compared key by key."""
    first, rest = mappings[0], mappings[1:]
    common: dict[str, Any] = {}
    for key, value in first.items():
        others = [mapping.get(key, _MISSING) for mapping in rest]
        if all(other == value for other in others):
            common[key] = value
        elif isinstance(value, Mapping) and all(isinstance(other, Mapping) for other in others):
            nested = _common([value, *others])
            if nested:
                common[key] = nested
    return common


def write_reports(report: Report, output: OutputFolder) -> list[str]:
    """report.json, report.md, report.html and (with matplotlib) report.png into ``output``;
    returns the names written."""
    texts = {
        "report.json": report.to_json(),
        "report.md": render_markdown(report),
        "report.html": render_html(report),
    }
    output.prepare()
    try:
        # All or nothing; a stale chart from an earlier --force run is removed, it would mislead.
        return output.publish([], texts, chart=lambda path: write_png(report, path))
    except BaseException:
        output.abort()
        raise
    finally:
        output.close()


@click.command()
@click.argument("reports", metavar="REPORT_OR_DIR...", nargs=-1, required=True,
                type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path),
              help="Write report.json, report.md, report.html and report.png here.")
@click.option("--force", is_flag=True, help="Overwrite files in an existing --out folder.")
def compare(reports: tuple[Path, ...], out: Path | None, force: bool) -> None:
    """Put the reports of several runs side by side, across backends.

    Each REPORT_OR_DIR is a report.json or a `compressor run --out` folder.
    Variants are renamed BACKEND:NAME (FOLDER:NAME when two runs share a
    backend); "smaller" is relative to the first report's original.

    \b
    Example:
      compressor compare out-fasttext out-onnx out-tflite --out comparison
    """
    found = merge(reports)
    merged = found.report
    if found.unrelated:
        click.echo(f"warning: {found.unrelated}", err=True)
    output = None
    if out is not None:
        output = OutputFolder(out, [report_file(path) for path in reports], force)
        output.check()
    click.echo(render_table(merged))
    if output is None:
        return
    written = write_reports(merged, output)
    click.echo(f"\nwrote {', '.join(written)} to {output.path}")
    if "report.png" not in written:
        reason = "install matplotlib for it" if find_spec("matplotlib") is None else (
            "no variant has both a size and an accuracy, agreement or cosine similarity"
        )
        click.echo(f"report.png skipped: {reason}", err=True)
