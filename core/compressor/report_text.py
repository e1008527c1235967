"""A report as text: the terminal table, its legend and footer, and ``report.md``."""

from __future__ import annotations

import math
from typing import Any

from compressor.headlines import agreement_cell, failed_cell, legend
from compressor.results import ReportData, human_bytes, percent


def _number(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


COLUMNS = (
    "variant", "steps", "size", "gzip", "smaller", "load ms", "p50 ms", "p99 ms", "speed",
    "peak RAM", "accuracy", "agreement",
)


def speed_cell(metrics: dict[str, Any]) -> str:
    """``2.31x ±2%``: how many times as fast as the original at batch 1 (the original's p50
    over the variant's), with the relative half-width of the ratio's 95% interval; without
    an interval (``--precision off``) just ``2.31x``; ``-`` for the original."""
    from compressor.latency_interval import percent_text

    ratio = metrics.get("latency_ratio")
    if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        return "-"
    width = metrics.get("latency_ratio_half_width")
    margin = f" ±{percent_text(width)}" if isinstance(width, (int, float)) and math.isfinite(width) else ""
    return f"{1.0 / ratio:.2f}x{margin}"


def rows(report: ReportData) -> list[list[str]]:
    """One row of display strings per variant, in :data:`COLUMNS` order; a FAILED
    variant's message is cut short (in full in :func:`legend_lines`)."""
    baseline = report.variants[0].metrics.get("size_bytes") if report.variants else None
    table = []
    for variant in report.variants:
        metrics = variant.metrics
        latency = metrics.get("latency_ms") or {}
        size = metrics.get("size_bytes")
        ratio = f"{baseline / size:.1f}x" if baseline and size else "-"
        agreement_text = agreement_cell(metrics)
        name = variant.name + (" !" if variant.budget_failures else "") + (" ?" if variant.warnings else "")
        if variant.error:
            table.append([name, " > ".join(variant.steps), failed_cell(variant.error)] + [""] * (len(COLUMNS) - 3))
            continue
        table.append([
            name,
            " > ".join(variant.steps) or "-",
            human_bytes(size),
            human_bytes(metrics.get("size_gzip_bytes")),
            ratio,
            _number(metrics.get("load_ms"), 1),
            _number(latency.get("p50"), 3),
            _number(latency.get("p99"), 3),
            speed_cell(metrics),
            human_bytes(metrics.get("peak_rss_bytes")),
            percent(metrics.get("accuracy")),
            agreement_text,
        ])
    return table


def render_table(report: ReportData) -> str:
    """A plain-text table for the terminal."""
    table = [list(COLUMNS), *rows(report)]
    # A FAILED row's message spans the columns after the steps: it does not widen them.
    widths = [max(len(row[i]) for row in table if i < 2 or not row[2].startswith("FAILED"))
              for i in range(len(COLUMNS))]
    lines = []
    for index, row in enumerate(table):
        if len(row) > 3 and row[2].startswith("FAILED"):
            lines.append("  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2]]))
        else:
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    from compressor.report_generation import generation_lines

    lines += generation_lines(report)
    footer = _footer(report)
    return "\n".join(lines + ([""] + footer if footer else []))


#: Above this within-run p50 spread the report says latency was measured on a noisy machine.
NOISY_SPREAD = 0.05


def legend_lines(report: ReportData) -> list[str]:
    """What the table's markers and figures mean, each output's task, failed variants in full."""
    failed = [f"FAILED {variant.name}: {variant.error}" for variant in report.variants if variant.error]
    return legend(report) + speed_legend(report) + failed


def speed_legend(report: ReportData) -> list[str]:
    """What the speed column means, where a variant has a speed figure."""
    shown = [variant.metrics for variant in report.variants if speed_cell(variant.metrics) != "-"]
    if not shown:
        return []
    line = "speed: the original's p50 / the variant's (batch 1)"
    if any("latency_ratio_half_width" in metrics for metrics in shown):
        line += ("; ±: half-width of its 95% interval, both timed side by side in interleaved blocks "
                 "(--precision)")
    return [line]


def _footer(report: ReportData) -> list[str]:
    lines = legend_lines(report)
    for variant in report.variants:
        for failure in variant.budget_failures:
            lines.append(f"! {variant.name}: {failure}")
        for warning in variant.warnings:
            lines.append(f"warning: {variant.name}: {warning}")
        for note in variant.notes:
            lines.append(f"note: {variant.name}: {note}")
    noise = noise_note(report)
    if noise:
        lines.append(f"note: {noise}")
    return lines


def noise_note(report: ReportData) -> str | None:
    """A warning when latency moved more than :data:`NOISY_SPREAD` within a run."""
    spreads = [
        spread for variant in report.variants
        if isinstance(spread := (variant.metrics.get("latency_ms") or {}).get("p50_spread"), float)
    ]
    if not spreads or max(spreads) <= NOISY_SPREAD:
        return None
    side_by_side = any("latency_ratio_half_width" in variant.metrics for variant in report.variants)
    return (
        f"latency p50 moved by up to {100 * max(spreads):.0f}% between timing windows "
        "(a busy or shared machine); compare p50_fastest_window in report.json, "
        "timed with --min-seconds 10"
        + ("; the speed column was timed side by side, which cancels such moves" if side_by_side else "")
    )


def render_markdown(report: ReportData) -> str:
    environment = report.environment
    cpu = environment.get("cpu", {})
    lines = [
        f"# compressor report: {report.model}",
        "",
        f"Backend `{report.backend}`, created {report.created}. "
        f"CPU: {cpu.get('model', '?')} ({', '.join(cpu.get('flags', [])) or 'no notable flags'}), "
        f"threads {report.settings.get('threads', '?')}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows(report):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    from compressor.report_generation import COLUMNS as GENERATION_COLUMNS
    from compressor.report_generation import generation_rows

    generated = generation_rows(report)
    if generated:
        lines += ["", "Generation (batch 1, greedy):", "", "| " + " | ".join(GENERATION_COLUMNS) + " |",
                  "|" + "---|" * len(GENERATION_COLUMNS), *["| " + " | ".join(row) + " |" for row in generated]]
    footer = _footer(report)
    if footer:
        lines += ["", *[f"- {line}" for line in footer]]
    for variant in report.variants[1:]:
        changed = variant.metrics.get("changed_examples")
        if changed:
            output = variant.metrics.get("compared_output")
            lines += [
                "",
                f"## {variant.name}: first inputs whose prediction changed"
                + (f" (output {output}, " if output else " (")
                + f"{variant.metrics.get('changed_count', len(changed))} in all)",
                "",
                "| input | original | compressed | label |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {c['index']} | {c['original']} | {c['compressed']} | {c.get('label', '')} |"
                for c in changed
            ]
    versions = environment.get("versions", {})
    if versions:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."]
    return "\n".join(lines) + "\n"
