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

from compressor.errors import UsageError
from compressor.models import ProgressCallback
from compressor.outputs import OutputFolder
from compressor.plugins import PluginHost
from compressor.report import Report
from compressor.run_request import RunRequest
from compressor.runner import PlannedRun, RunOutcome
from compressor.session import Plan, checked_plan
from compressor.worker import MeasuredArtifact

#: The backend whose original is the reference when it is run (the model as trained).
PREFERRED_REFERENCE = "torch"


def run_many(request: RunRequest, backends: Sequence[str], host: PluginHost,
             progress: ProgressCallback) -> RunOutcome:
    """Every backend's plan checked, then every model and its data loaded and every
    variant shown to its plugin, then every original made and measured, and only then
    the variants made: a refusal on any backend comes before any work. The outcome's
    report is the merged one; its failures are every backend's."""
    from compressor.charts import write_png
    from compressor.evaluation import HEADLINE_KEYS, budget_failures, compare_outputs
    from compressor.merging import merge_reports
    from compressor.report import render_reports
    from compressor.run_progress import tracking

    if len(set(backends)) != len(backends):
        raise UsageError(f"--backend names a backend twice: {', '.join(backends)}")
    for name in backends:
        host.backend(name)
    outer = OutputFolder(request.out, [request.model], request.force)
    outer.check()
    # Nothing loaded, nothing written: each backend's request checked whole, its backend resolved once.
    plans = {name: _checked_plan(replace(request, backend=name, out=outer.path / name), host) for name in backends}
    tracker = tracking(progress)
    outer.prepare()
    outcomes: list[RunOutcome] = []
    staged: dict[str, Path] = {}
    try:
        with ExitStack() as stack:
            runs = []
            for name in backends:
                staged[name] = outer.staging_folder(name)
                runs.append(PlannedRun(replace(request, backend=name, out=staged[name], force=False), host,
                                       tracker.nested(f"{name} "), plans[name]))
            for planned in runs:
                stack.enter_context(planned)
            for planned in runs:
                planned.start()
            for planned in runs:
                outcomes.append(planned.finish())
        merged = _relocated(merge_reports(list(staged.values())), staged, outer.path)
        reference_index = backends.index(PREFERRED_REFERENCE) if PREFERRED_REFERENCE in backends else 0
        chosen = outcomes[reference_index]
        reference = chosen.measured[0]
        labels = chosen.eval_data.labels if chosen.eval_data is not None else None
        flat = [item for outcome in outcomes for item in outcome.measured]
        base = merged.variants[sum(len(outcome.report.variants) for outcome in outcomes[:reference_index])].metrics
        reference_name = f"{backends[reference_index]}:original"
        for variant, measured in zip(merged.variants, flat):
            if reference is None or measured is None or variant.error or not measured.kept or not reference.kept:
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
    return RunOutcome(merged, flat, chosen.eval_data, [failure for outcome in outcomes for failure in outcome.failures])


def _checked_plan(request: RunRequest, host: PluginHost) -> Plan:
    """One backend's request checked with nothing loaded (:func:`compressor.session.checked_plan`),
    with its default variants when none are asked (as ``compressor run`` makes them)."""
    variants = () if request.original_only else request.variants
    return checked_plan(request, host, variants, defaults=not request.original_only)


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


def _aligned(measured: MeasuredArtifact, reference: MeasuredArtifact) -> MeasuredArtifact:
    """``measured`` with its outputs named as the reference's, matched by position when the
    runtimes name them differently."""
    ours, theirs = list(measured.output_info), list(reference.output_info)
    if set(ours) == set(theirs) or len(ours) != len(theirs):
        return measured
    names = dict(zip(ours, theirs))
    return replace(measured, output_info={names.get(key, key): value for key, value in measured.output_info.items()},
                   kept={names.get(key, key): value for key, value in measured.kept.items()})
