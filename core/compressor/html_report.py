"""``report.html``: one self-contained page per report (inline CSS and SVG, no scripts).

Every string that comes from a report (variant names, labels, notes, paths) is
escaped, so a report built from untrusted files cannot inject markup.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from compressor.charts import LATENCY, SIZE, front_names, quality_measure, report_charts
from compressor.html_outputs import digits, outputs_table
from compressor.report_text import COLUMNS, noise_note, rows
from compressor.results import ReportData, VariantResult

READ_BEFORE_DEPLOYING = (
    "Read the changed inputs below before you deploy a variant: accuracy and agreement say how "
    "often the compressed model answers differently, these inputs show where, and only you can "
    "tell whether those are inputs your users care about."
)
PARETO_EXPLAINED = (
    "A variant is on the Pareto front (blue, joined) when no other variant is at most as large "
    "(or as slow) and at least as accurate, and better in one of the two. Every point off the "
    "front is beaten by a point on it: choose from the front, the smallest or fastest variant "
    "whose quality you accept."
)
#: Confusion matrices with more classes than this show only the classes that changed.
FULL_CONFUSION_CLASSES = 12

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; color: #24292f;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { margin-top: 2em; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
thead th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.front td:first-child { font-weight: 600; }
tr.over-budget td { background: #ffebe9; } tr.failed td { background: #fff8c5; }
.alert { border: 1px solid #cf222e; background: #ffebe9; padding: .5em 1em; border-radius: 6px; }
.warning { border: 1px solid #bf8700; background: #fff8c5; padding: .5em 1em; border-radius: 6px; }
.muted { color: #57606a; } figure { margin: 1em 0; } svg { max-width: 100%; height: auto; }
table.confusion td { text-align: right; min-width: 2.5em; }
table.confusion td.same { background: #dafbe1; } table.confusion td.moved { background: #ffcecb; }
article { border-top: 1px solid #eaeef2; padding-top: .5em; }
code { background: #f6f8fa; padding: 0 .3em; border-radius: 4px; }
"""


def render_html(report: ReportData) -> str:
    title = f"compressor report: {report.model}"
    sections = [
        _summary(report),
        _table(report),
        _charts(report),
        _notes(report),
        _fidelity(report),
        _sources(report),
        _environment(report),
    ]
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{escape(title)}</h1>",
        *[section for section in sections if section],
        "</body>",
        "</html>",
    ]) + "\n"


def _text(value: Any) -> str:
    """A setting or environment value as escaped display text."""
    if value is None:
        return "none"
    if isinstance(value, Mapping):
        return escape(", ".join(f"{k}={v}" for k, v in value.items())) or "none"
    if isinstance(value, (list, tuple)):
        return escape(", ".join(str(v) for v in value)) or "none"
    return escape(str(value))


def _key_values(pairs: Sequence[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{escape(key)}</th><td>{_text(value)}</td></tr>" for key, value in pairs)
    return f"<table>{cells}</table>"


def _summary(report: ReportData) -> str:
    parts = [
        f'<p class="muted">Backend <code>{escape(report.backend)}</code>, created '
        f"{escape(report.created)}, {len(report.variants)} variants.</p>"
    ]
    search = report.settings.get("search") if isinstance(report.settings, dict) else None
    if isinstance(search, dict):
        parts.append(
            f"<p>Search for the least {escape(str(search.get('objective')))}: <b>winner "
            f"{escape(str(search.get('winner')))}</b> after {escape(str(search.get('tried')))} trials "
            f"({escape(str(search.get('measured')))} measured, {escape(str(search.get('skipped', 0)))} "
            f"skipped as unable to win) of {escape(str(search.get('space_size')))} configurations, "
            f"seed {escape(str(search.get('seed')))}.</p>")
    quality = quality_measure(report)
    if quality is not None:
        for measure, label in ((SIZE, "size"), (LATENCY, "latency")):
            names = front_names(report, measure)
            if names:
                parts.append(f"<p>Best trade-offs of {label} against {escape(quality.title)} "
                             f"(Pareto front): <b>{escape(', '.join(names))}</b>.</p>")
    over_budget = [v for v in report.variants if v.budget_failures]
    if over_budget:
        items = "".join(
            f"<li><b>{escape(v.name)}</b>: {escape(failure)}</li>"
            for v in over_budget for failure in v.budget_failures
        )
        parts.append(f'<div class="alert"><b>Outside the budget</b> (marked ! in the table):'
                     f"<ul>{items}</ul></div>")
    warned = [v for v in report.variants if v.warnings]
    if warned:
        items = "".join(f"<li><b>{escape(v.name)}</b>: {escape(warning)}</li>"
                        for v in warned for warning in v.warnings)
        parts.append(f'<div class="warning"><b>Worse than it looks</b> (marked ? in the table; never a '
                     f"best trade-off):<ul>{items}</ul></div>")
    if report.failed_variants:
        items = "".join(f"<li><b>{escape(v.name)}</b>: {escape(v.error or '')}</li>"
                        for v in report.failed_variants)
        parts.append(f'<div class="warning"><b>Failed variants</b>:<ul>{items}</ul></div>')
    return "\n".join(parts)


def _table(report: ReportData) -> str:
    front = set(front_names(report))
    head = "".join(f"<th>{escape(column)}</th>" for column in COLUMNS)
    body = []
    for variant, row in zip(report.variants, rows(report), strict=True):
        classes = [name for name, flag in (
            ("front", variant.name in front), ("over-budget", bool(variant.budget_failures)),
            ("failed", bool(variant.error)),
        ) if flag]
        if variant.error:
            # The page wraps long text: the whole message, not the table's cut one.
            cells = (f"<td>{escape(row[0])}</td><td>{escape(row[1])}</td>"
                     f'<td colspan="{len(COLUMNS) - 2}">FAILED: {escape(variant.error)}</td>')
        else:
            cells = "".join(
                f'<td class="num">{escape(cell)}</td>' if index >= 2 else f"<td>{escape(cell)}</td>"
                for index, cell in enumerate(row)
            )
        attribute = f' class="{" ".join(classes)}"' if classes else ""
        body.append(f"<tr{attribute}>{cells}</tr>")
    baseline = escape(report.variants[0].name) if report.variants else "-"
    return "\n".join([
        "<h2>Comparison</h2>",
        f"<table><thead><tr>{head}</tr></thead><tbody>",
        *body,
        "</tbody></table>",
        f'<p class="muted">"smaller" is relative to <b>{baseline}</b>. Bold: on the size Pareto '
        "front. ! and red: outside the budget. ? : worse than it looks (see the warnings above), never "
        "a best trade-off. FAILED and yellow: the variant could not be made or measured. p50 and p99 "
        "are latency percentiles for one example (batch 1); speed is the original's p50 over the "
        "variant's, ± the half-width of its 95% interval where the two were timed side by side; peak RAM is the measuring process's peak "
        "resident memory, runtime included. agreement: each output's headline figure against the "
        "original (what each is: under Fidelity).</p>",
    ])


def _charts(report: ReportData) -> str:
    charts = report_charts(report)
    if not charts:
        return ""
    figures = [f"<figure>{chart.svg}</figure>" for chart in charts]
    explanation = f"<p>{escape(PARETO_EXPLAINED)}</p>" if quality_measure(report) else (
        '<p class="muted">No accuracy, agreement or similarity was measured (pass --data), '
        "so there is no Pareto front.</p>"
    )
    return "\n".join(["<h2>Charts</h2>", explanation, *figures,
                      '<p class="muted">Bars: grey is an original, red is outside the budget.</p>'])


def _notes(report: ReportData) -> str:
    items = [f"<li><b>{escape(v.name)}</b>: {escape(note)}</li>" for v in report.variants for note in v.notes]
    noise = noise_note(report)
    if noise:
        items.append(f"<li>{escape(noise)}</li>")
    return f"<h2>Notes</h2><ul>{''.join(items)}</ul>" if items else ""


def _original_for(report: ReportData, index: int) -> VariantResult:
    """The original a variant was compared with: the closest earlier variant without steps."""
    for candidate in reversed(report.variants[: index + 1]):
        if not candidate.steps:
            return candidate
    return report.variants[0]


def _fidelity(report: ReportData) -> str:
    compressed = [(i, v) for i, v in enumerate(report.variants) if v.steps and not v.error]
    if not compressed:
        return ""
    parts = ["<h2>Fidelity: what changed</h2>", f"<p><b>{escape(READ_BEFORE_DEPLOYING)}</b></p>"]
    for index, variant in compressed:
        parts.append(_variant_fidelity(variant, _original_for(report, index)))
    return "\n".join(parts)


def _percent(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else "-"


def _variant_fidelity(variant: VariantResult, original: VariantResult) -> str:
    metrics = variant.metrics
    facts = []
    accuracy, base = metrics.get("accuracy"), original.metrics.get("accuracy")
    if isinstance(accuracy, (int, float)):
        change = ""
        if isinstance(base, (int, float)):
            change = f" ({100 * (accuracy - base):+.2f} pt vs {escape(original.name)})"
        facts.append(f"accuracy {_percent(accuracy)}{change}")
    outputs = metrics.get("outputs")
    if not isinstance(outputs, Mapping) or not outputs:
        facts += _overall_facts(metrics, original.name)
    parts = [f"<article><h3>{escape(variant.name)}</h3>",
             f'<p class="muted">{escape(" > ".join(variant.steps))}</p>']
    table = outputs_table(outputs, original.name) if isinstance(outputs, Mapping) and outputs else ""
    if not facts and not table:
        parts.append('<p class="muted">Nothing to compare: pass --data to measure accuracy and '
                     "agreement.</p></article>")
        return "\n".join(parts)
    if facts:
        parts.append(f"<p>{'; '.join(facts)}.</p>")
    parts.append(table)
    if metrics.get("changed_count") == 0 and metrics.get("task") in (None, "classifier", "probability"):
        parts.append(f"<p>Every top prediction matches {escape(original.name)}.</p>")
    parts.append(_confusion(metrics.get("confusion")))
    parts.append(_changed(metrics.get("changed_examples"), metrics.get("changed_count")))
    parts.append("</article>")
    return "\n".join(part for part in parts if part)


def _overall_facts(metrics: Mapping[str, Any], original: str) -> list[str]:
    """Agreement and cosine of a backend that compares its outputs itself (no per-output entries)."""
    facts = []
    if isinstance(metrics.get("agreement"), (int, float)):
        changed = metrics.get("changed_count")
        counted = f" ({changed} inputs changed)" if isinstance(changed, int) else ""
        facts.append(f"agreement with {escape(original)} {_percent(metrics['agreement'])}{counted}")
    cosine = metrics.get("cosine")
    if isinstance(cosine, Mapping) and isinstance(cosine.get("mean"), (int, float)):
        facts.append(f"cosine similarity mean {digits(cosine['mean'])}, min {digits(cosine.get('min'))}")
    return facts


def _confusion(confusion: Any) -> str:
    if not isinstance(confusion, Mapping):
        return ""
    labels, matrix = confusion.get("labels"), confusion.get("matrix")
    if not isinstance(labels, list) or not isinstance(matrix, list) or len(matrix) != len(labels):
        return ""
    if not all(isinstance(row, list) and len(row) == len(labels) for row in matrix):
        return ""
    size = len(labels)
    moved = {(i, j) for i, row in enumerate(matrix) for j, count in enumerate(row) if i != j and count}
    if not moved:
        return ""
    keep = list(range(size))
    omitted = ""
    if size > FULL_CONFUSION_CLASSES:
        keep = sorted({i for i, _ in moved} | {j for _, j in moved})
        omitted = f" {size - len(keep)} classes whose predictions never changed are left out."
    head = "".join(f"<th>{escape(str(labels[j]))}</th>" for j in keep)
    body = []
    for i in keep:
        cells = []
        for j in keep:
            count = matrix[i][j]
            kind = "same" if i == j else ("moved" if (i, j) in moved else "")
            cells.append(f'<td class="{kind}">{escape(str(count))}</td>')
        body.append(f"<tr><th>{escape(str(labels[i]))}</th>{''.join(cells)}</tr>")
    return "\n".join([
        "<table class=\"confusion\"><caption>Top prediction of the original (rows) against the "
        f"compressed variant (columns).{escape(omitted)}</caption>",
        f"<thead><tr><th>original \\ compressed</th>{head}</tr></thead><tbody>",
        *body,
        "</tbody></table>",
    ])


def _changed(examples: Any, count: Any) -> str:
    if not isinstance(examples, list) or not examples:
        return ""
    examples = [e for e in examples if isinstance(e, Mapping)]
    labelled = any("label" in e for e in examples)
    head = "<th>input #</th><th>original</th><th>compressed</th>"
    if labelled:
        head += "<th>label</th><th>right</th>"
    body = []
    for example in examples:
        cells = [example.get("index"), example.get("original"), example.get("compressed")]
        if labelled:
            label = example.get("label")
            right = ("original" if example.get("original") == label else
                     "compressed" if example.get("compressed") == label else "neither")
            cells += [label, right]
        body.append("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in cells) + "</tr>")
    total = count if isinstance(count, int) else len(examples)
    return "\n".join([
        f"<table><caption>The first {len(examples)} of {total} inputs whose top prediction "
        "changed (index into the evaluation data).</caption>",
        f"<thead><tr>{head}</tr></thead><tbody>",
        *body,
        "</tbody></table>",
    ])


def _sources(report: ReportData) -> str:
    """For merged reports (``compressor compare``): where each group of variants came from."""
    sources: dict[str, Mapping[str, Any]] = {}
    for variant in report.variants:
        source = variant.metadata.get("source")
        if isinstance(source, Mapping):
            sources.setdefault(str(source.get("report")), source)
    if not sources:
        return ""
    head = "".join(f"<th>{c}</th>" for c in ("prefix", "backend", "model", "report", "created", "CPU", "threads"))
    body: list[str] = []
    conditions: set[tuple[str, str]] = set()
    for path, source in sources.items():
        cpu = (source.get("environment") or {}).get("cpu") or {}
        threads = (source.get("settings") or {}).get("threads")
        conditions.add((str(cpu.get("model")), str(threads)))
        cells = [source.get("prefix"), source.get("backend"), source.get("model"), path,
                 source.get("created"), cpu.get("model"), threads]
        body.append("<tr>" + "".join(f"<td>{_text(c)}</td>" for c in cells) + "</tr>")
    warning = ""
    if len(conditions) > 1:
        warning = ('<p class="warning">These runs were measured on different CPUs or thread counts: '
                   "compare their latency and RAM with care.</p>")
    return "\n".join([
        "<h2>Sources</h2>",
        "<p>Variants are named <code>prefix:variant</code>; each is compared with the original of "
        "its own run (agreement, changed inputs), while \"smaller\" is relative to the first "
        "report's original.</p>",
        warning,
        f"<table><thead><tr>{head}</tr></thead><tbody>",
        *body,
        "</tbody></table>",
    ])


def _environment(report: ReportData) -> str:
    environment, settings = report.environment, report.settings
    cpu = environment.get("cpu") or {}
    machine = [
        ("CPU", cpu.get("model")), ("cores", cpu.get("cores")),
        ("CPU flags", (cpu.get("flags") or "no notable flags") if "flags" in cpu else None),
        ("Python", environment.get("python")), ("platform", environment.get("platform")),
        *sorted((environment.get("versions") or {}).items()),
    ]
    budgets = [(key.replace("_", "-"), value) for key, value in report.budgets.items() if value is not None]
    merged = any("source" in v.metadata for v in report.variants)
    parts = [
        "<h2>Environment and settings</h2>",
        '<p class="muted">What all merged runs have in common; see Sources for each run.</p>'
        if merged else "",
        "<h3>Machine and versions</h3>",
        _key_values([(k, v) for k, v in machine if v is not None]),
        "<h3>Measurement settings</h3>",
        _key_values(list(settings.items())) if settings else '<p class="muted">none recorded</p>',
    ]
    if budgets:
        parts += ["<h3>Budgets</h3>", _key_values(budgets)]
    return "\n".join(part for part in parts if part)
