"""The comparison report: :class:`Report`, and where each of its forms is made.

The report's data is :class:`compressor.results.ReportData` (every module that reads
or fills a report works on that); :class:`Report` adds what needs the modules above
it: choosing a variant (``best``, ``to_pandas``, :mod:`compressor.selection`) and the
notebook view (:mod:`compressor.html_report`). The text forms are in
:mod:`compressor.report_text` and are re-exported here, as are the data types.
``report.json`` is documented in ``docs/report-format.md``; its keys are stable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compressor.html_report import _table, render_html
from compressor.report_text import (
    COLUMNS,
    NOISY_SPREAD,
    legend_lines,
    noise_note,
    render_markdown,
    render_table,
    rows,
)
from compressor.results import (
    REPORT_VERSION,
    ReportData,
    VariantResult,
    finite,
    human_bytes,
    summarize_repeats,
)
from compressor.selection import best, to_pandas

__all__ = ["COLUMNS", "NOISY_SPREAD", "REPORT_VERSION", "Report", "VariantResult", "finite", "human_bytes",
           "legend_lines", "noise_note", "render_markdown", "render_reports", "render_table", "rows",
           "summarize_repeats"]


class Report(ReportData):
    """A run's report: its variants with their metrics, the settings and the environment."""

    def __repr__(self) -> str:
        """One line (``print(report)``); :func:`render_table` or ``to_pandas()`` for the figures."""
        names = [variant.name for variant in self.variants]
        shown = ", ".join(names[:6]) + (f", ... ({len(names) - 6} more)" if len(names) > 6 else "")
        folder = f" in {self.folder}" if self.folder is not None else ""
        return f"<Report of {Path(self.model).name or self.model} on {self.backend}: {shown}{folder}>"

    def _repr_html_(self) -> str:
        """A notebook shows the comparison table (as report.html's)."""
        from html import escape

        folder = f" &middot; {escape(str(self.folder))}" if self.folder is not None else ""
        return (f"<div><p><b>{escape(self.model)}</b> on {escape(self.backend)}{folder}</p>"
                f"{_table(self)}</div>")

    def best(self, objective: str = "size", **bounds: Any) -> VariantResult | None:
        """The smallest (``"size"``), fastest (``"latency"``) or leanest (``"peak_ram"``)
        variant within ``min_agreement``, ``max_accuracy_drop``, ``min_cosine``; see
        :func:`compressor.selection.best`."""
        return best(self, objective, **bounds)

    def to_pandas(self) -> Any:
        """A pandas DataFrame, one row per variant (needs pandas)."""
        return to_pandas(self)


def render_reports(report: ReportData) -> dict[str, str]:
    """Every text report format, by file name."""
    return {
        "report.json": report.to_json(),
        "report.md": render_markdown(report),
        "report.html": render_html(report),
    }
