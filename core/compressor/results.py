"""The data of a comparison report: :class:`VariantResult` and :class:`ReportData`.

Everything that reads or fills a report (budgets, cautions, selection, the table, the
charts, the HTML page) works on these; :class:`compressor.report.Report` adds what
needs those modules (``best``, ``to_pandas``, the notebook view) on top. ``report.json``
is documented in ``docs/report-format.md``; its keys are stable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, TypeVar

REPORT_VERSION = 1
_Report = TypeVar("_Report", bound="ReportData")


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
            facts.append(f"agreement {percent(self.metrics['agreement'])}")
        marks = (" !" if self.budget_failures else "") + (" ?" if self.warnings else "")
        return f"<VariantResult {self.name!r}{marks}: {steps}{'; ' if facts else ''}{', '.join(facts)}>"


@dataclass
class ReportData:
    """A report's fields and what needs nothing but them; see :class:`compressor.report.Report`."""

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

    def attach_folder(self, folder: Path, owned: TemporaryDirectory[str] | None = None) -> None:
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

    def variant(self, name: str) -> VariantResult:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(f"no variant {name!r}; the variants are {', '.join(v.name for v in self.variants)}")

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
    def from_json(cls: type[_Report], data: Mapping[str, Any]) -> _Report:
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


def human_bytes(count: float | None) -> str:
    if count is None or (isinstance(count, float) and math.isnan(count)):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GB"


def percent(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


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
