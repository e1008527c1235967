"""``compressor run MODEL --backend onnx,tflite,torch``: the same variants on several
backends, and one comparison against one original.

Each backend runs as ``compressor run`` would, into ``--out/<backend>/`` (its own
artifacts and reports, compared with its own original); every run is made in
``--out``'s staging folder first and the whole set is published at the end, all
or nothing. Then ``--out`` gets the
merged report, variants named ``<backend>:<variant>``, where every variant is
compared with **one** reference: the ``torch`` backend's original when it is
among them (the model as trained), else the first backend's. The comparison
with each variant's own original stays under ``metrics.vs_own_original``.
Outputs are matched by name, or by position when the runtimes name them
differently.

Every refusal comes before any work: each backend's request is checked with
nothing loaded (steps, parameters, options, the data each step needs), then every
backend's model and data are loaded and every variant shown to its plugin
(``compressor_check_steps``), then every original is made and measured (the data,
labels and ``--set label_output=`` checked against its outputs), and only then are
variants made. The backends' models are held in memory together meanwhile.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

from compressor.errors import UsageError
from compressor.models import ProgressCallback
from compressor.outputs import OutputFolder
from compressor.report import Report

#: The backend whose original is the reference when it is run (the model as trained).
PREFERRED_REFERENCE = "torch"


def run_many(request: Any, backends: Sequence[str], host: Any, progress: ProgressCallback) -> Report:
    """Every backend's plan checked, then every model and its data loaded and every
    variant shown to its plugin, then every original made and measured, and only then
    the variants made: a refusal on any backend comes before any work."""
    from compressor.charts import write_png
    from compressor.evaluation import HEADLINE_KEYS, budget_failures, compare_outputs
    from compressor.merging import merge_reports
    from compressor.run_progress import tracking
    from compressor.runner import PlannedRun, render_reports

    if len(set(backends)) != len(backends):
        raise UsageError(f"--backend names a backend twice: {', '.join(backends)}")
    for name in backends:
        host.backend(name)
    outer = OutputFolder(request.out, [request.model], request.force)
    outer.check()
    for name in backends:  # nothing loaded, nothing written: each backend's request checked whole
        _check_plan(replace(request, backend=name, out=outer.path / name), host)
    tracker = tracking(progress)
    outer.prepare()
    reports: list[Report] = []
    staged: dict[str, Path] = {}
    try:
        with ExitStack() as stack:
            plans = []
            for name in backends:
                staged[name] = outer.staging_folder(name)
                plans.append(PlannedRun(replace(request, backend=name, out=staged[name], force=False), host,
                                        tracker.nested(f"{name} ")))
            for plan in plans:
                stack.enter_context(plan)
            for plan in plans:
                plan.start()
            for plan in plans:
                reports.append(plan.finish())
        merged = _relocated(merge_reports(list(staged.values())), staged, outer.path)
        reference_index = backends.index(PREFERRED_REFERENCE) if PREFERRED_REFERENCE in backends else 0
        reference = reports[reference_index].measured[0]  # type: ignore[attr-defined]
        labels = _labels(reports[reference_index])
        flat = [item for report in reports for item in report.measured]  # type: ignore[attr-defined]
        base = merged.variants[sum(len(r.variants) for r in reports[:reference_index])].metrics
        reference_name = f"{backends[reference_index]}:original"
        for variant, measured in zip(merged.variants, flat):
            if measured is None or variant.error or not measured.kept or not reference.kept:
                continue
            own = {key: variant.metrics[key] for key in HEADLINE_KEYS if key in variant.metrics}
            compared = compare_outputs(reference, _aligned(measured, reference), labels)
            variant.metrics.update({key: value for key, value in compared.items() if key != "outputs"})
            variant.metrics["vs_own_original"] = own
            variant.metrics["reference"] = reference_name
            variant.budget_failures = budget_failures(variant.metrics, base, merged.budgets)
        merged.settings["reference"] = reference_name
        without_chart = [f"{name}/report.png" for name, folder in staged.items()
                         if not (folder / "report.png").exists()]
        outer.publish([], render_reports(merged), chart=lambda path: write_png(merged, path),
                      trees=staged, stale=without_chart)
    except BaseException:
        outer.abort()
        raise
    finally:
        outer.close()
    tracker.finish()
    return merged


def _check_plan(request: Any, host: Any) -> None:
    """One backend's request checked with nothing loaded (:func:`compressor.session.checked_plan`),
    with its default variants when none are asked (as ``compressor run`` makes them)."""
    from compressor.recipes import variants_from_strings
    from compressor.runner import resolve_backend
    from compressor.session import checked_plan

    variants = list(request.variants)
    if not variants and not request.original_only and request.model.exists():
        variants = variants_from_strings(resolve_backend(host, request.model, request.backend).default_variants)
    checked_plan(request, host, variants)


def _relocated(report: Report, staged: dict[str, Path], out: Path) -> Report:
    """The merged report's paths (artifacts, source reports) where they will be after publishing."""
    moves = {str(folder): str(out / name) for name, folder in staged.items()}

    def moved(path: str) -> str:
        for old, new in moves.items():
            if path == old or path.startswith(old + "/"):
                return new + path[len(old):]
        return path

    for variant in report.variants:
        variant.artifact = moved(variant.artifact) if variant.artifact else variant.artifact
        source = variant.metadata.get("source")
        if isinstance(source, dict) and isinstance(source.get("report"), str):
            source["report"] = moved(source["report"])
    return report


def _labels(report: Report) -> Any | None:
    data = getattr(report, "eval_data", None)
    return None if data is None else data.labels


class _Renamed:
    """A measurement whose outputs carry the reference's names (matched by position)."""

    def __init__(self, measured: Any, names: dict[str, str]) -> None:
        self.output_info = {names.get(key, key): value for key, value in measured.output_info.items()}
        self.kept = {names.get(key, key): value for key, value in measured.kept.items()}
        self.metrics, self.predictions, self.outputs = measured.metrics, measured.predictions, measured.outputs


def _aligned(measured: Any, reference: Any) -> Any:
    ours, theirs = list(measured.output_info), list(reference.output_info)
    if set(ours) == set(theirs) or len(ours) != len(theirs):
        return measured
    return _Renamed(measured, dict(zip(ours, theirs)))
