"""The comparison report: data model, ``report.json``, ``report.md`` and the terminal table.

``report.json`` is documented in ``docs/report-format.md``; its keys are stable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPORT_VERSION = 1


@dataclass
class VariantResult:
    name: str
    steps: list[str]
    artifact: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    budget_failures: list[str] = field(default_factory=list)
    #: Why this variant is worse than it looks (slower, disagreeing, not smaller); see compressor.cautions.
    warnings: list[str] = field(default_factory=list)

    @property
    def artifact_path(self) -> Path | None:
        """Where the artifact is, once the report knows its folder (the Python API's reports do)."""
        folder = getattr(self, "_folder", None)
        return folder / self.artifact if folder is not None and self.artifact else None

    def __repr__(self) -> str:
        """One line: the name, the steps, the size and the headline figure (or the error)."""
        steps = " > ".join(self.steps) or "as loaded"
        if self.error:
            return f"<VariantResult {self.name!r}: {steps}; FAILED: {self.error[:80]}>"
        facts = [human_bytes(self.metrics["size_bytes"])] if self.metrics.get("size_bytes") else []
        if isinstance(self.metrics.get("agreement"), (int, float)):
            facts.append(f"agreement {_percent(self.metrics['agreement'])}")
        marks = (" !" if self.budget_failures else "") + (" ?" if self.warnings else "")
        return f"<VariantResult {self.name!r}{marks}: {steps}{'; ' if facts else ''}{', '.join(facts)}>"


@dataclass
class Report:
    model: str
    backend: str
    created: str
    variants: list[VariantResult]
    settings: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    budgets: dict[str, Any] = field(default_factory=dict)
    report_version: int = REPORT_VERSION

    @property
    def folder(self) -> Path | None:
        """The folder holding the artifacts and reports (set by the Python API)."""
        return getattr(self, "_folder", None)

    def attach_folder(self, folder: Path, owned: Any | None = None) -> None:
        """Say where the artifacts are; ``owned`` (a TemporaryDirectory) lives as long as the report."""
        self._folder = folder
        self._owned = owned
        for variant in self.variants:
            variant._folder = folder  # type: ignore[attr-defined]

    def cleanup(self) -> None:
        """Remove the temporary folder a Python API run without ``out`` wrote into."""
        owned = getattr(self, "_owned", None)
        if owned is not None:
            owned.cleanup()
            self._owned = None

    def __repr__(self) -> str:
        """One line (``print(report)``); :func:`render_table` or ``to_pandas()`` for the figures."""
        names = [variant.name for variant in self.variants]
        shown = ", ".join(names[:6]) + (f", ... ({len(names) - 6} more)" if len(names) > 6 else "")
        folder = f" in {self.folder}" if self.folder is not None else ""
        return f"<Report of {Path(self.model).name or self.model} on {self.backend}: {shown}{folder}>"

    def _repr_html_(self) -> str:
        """A notebook shows the comparison table (as report.html's)."""
        from html import escape

        from compressor.html_report import _table

        folder = f" &middot; {escape(str(self.folder))}" if self.folder is not None else ""
        return (f"<div><p><b>{escape(self.model)}</b> on {escape(self.backend)}{folder}</p>"
                f"{_table(self)}</div>")

    def variant(self, name: str) -> VariantResult:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(f"no variant {name!r}; the variants are {', '.join(v.name for v in self.variants)}")

    def best(self, objective: str = "size", **bounds: Any) -> VariantResult | None:
        """The smallest (``"size"``), fastest (``"latency"``) or leanest (``"peak_ram"``)
        variant within ``min_agreement``, ``max_accuracy_drop``, ``min_cosine``; see
        :func:`compressor.selection.best`."""
        from compressor.selection import best

        return best(self, objective, **bounds)

    def to_pandas(self) -> Any:
        """A pandas DataFrame, one row per variant (needs pandas)."""
        from compressor.selection import to_pandas

        return to_pandas(self)

    @property
    def failed_budget(self) -> bool:
        return any(v.budget_failures for v in self.variants)

    @property
    def failed_variants(self) -> list[VariantResult]:
        return [v for v in self.variants if v.error]

    def to_json(self) -> str:
        """Strict JSON: a value that is not a finite number (NaN, infinity) is null."""
        plain = json.loads(json.dumps(asdict(self), default=_jsonable))
        return json.dumps(finite(plain), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Report:
        fields = {k: v for k, v in data.items() if k != "variants"}
        return cls(variants=[VariantResult(**v) for v in data["variants"]], **fields)


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite(item) for item in value]
    return value


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


# ---------------------------------------------------------------- formatting


def human_bytes(count: float | None) -> str:
    if count is None or (isinstance(count, float) and math.isnan(count)):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GB"


def _number(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _percent(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


COLUMNS = (
    "variant", "steps", "size", "gzip", "smaller", "load ms", "p50 ms", "p99 ms",
    "peak RAM", "accuracy", "agreement",
)


def rows(report: Report) -> list[list[str]]:
    """One row of display strings per variant, in :data:`COLUMNS` order; a FAILED
    variant's message is cut short (in full in :func:`legend_lines`)."""
    from compressor.headlines import agreement_cell, failed_cell

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
            table.append([name, " > ".join(variant.steps), failed_cell(variant.error)] + [""] * 8)
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
            human_bytes(metrics.get("peak_rss_bytes")),
            _percent(metrics.get("accuracy")),
            agreement_text,
        ])
    return table


def render_table(report: Report) -> str:
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
    footer = _footer(report)
    return "\n".join(lines + ([""] + footer if footer else []))


#: Above this within-run p50 spread the report says latency was measured on a noisy machine.
NOISY_SPREAD = 0.05


def legend_lines(report: Report) -> list[str]:
    """What the table's markers and figures mean, each output's task, failed variants in full."""
    from compressor.headlines import legend

    failed = [f"FAILED {variant.name}: {variant.error}" for variant in report.variants if variant.error]
    return legend(report) + failed


def _footer(report: Report) -> list[str]:
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


def noise_note(report: Report) -> str | None:
    """A warning when latency moved more than :data:`NOISY_SPREAD` within a run."""
    spreads = [
        spread for variant in report.variants
        if isinstance(spread := (variant.metrics.get("latency_ms") or {}).get("p50_spread"), float)
    ]
    if not spreads or max(spreads) <= NOISY_SPREAD:
        return None
    return (
        f"latency p50 moved by up to {100 * max(spreads):.0f}% between timing windows "
        "(a busy or shared machine); compare p50_fastest_window in report.json, "
        "timed with --min-seconds 10"
    )


def render_markdown(report: Report) -> str:
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


def summarize_repeats(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Median of every numeric leaf across repeated measurements; other values from the first."""
    if len(runs) == 1:
        return dict(runs[0])
    merged: dict[str, Any] = {}
    for key, first in runs[0].items():
        values = [run.get(key) for run in runs]
        if isinstance(first, Mapping):
            merged[key] = summarize_repeats([v for v in values if isinstance(v, Mapping)])
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            numbers = sorted(v for v in values if isinstance(v, (int, float)))
            middle = len(numbers) // 2
            median = numbers[middle] if len(numbers) % 2 else (numbers[middle - 1] + numbers[middle]) / 2
            merged[key] = type(first)(median) if isinstance(first, int) else median
        else:
            merged[key] = first
    return merged
