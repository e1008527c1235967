"""The Python API: what the CLI does, from a script or a notebook cell.

    import compressor

    report = compressor.run("model.onnx", ["quantize dynamic", "quantize fp16"], data="eval.npz")
    report.to_pandas()                       # one row per variant
    best = report.best("size", min_agreement=0.99)
    best.artifact_path                       # the file to deploy

Without ``out``, artifacts and reports live in a temporary folder that the
returned :class:`~compressor.report.Report` owns (removed when the report is
garbage-collected or :meth:`~compressor.report.Report.cleanup` is called);
with ``out`` they are written there as by ``compressor run --out``. Errors
are the :class:`~compressor.errors.CompressorError` hierarchy, as on the
command line, with the same messages.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from compressor.errors import UsageError
from compressor.models import MeasureSettings, ProgressCallback
from compressor.recipes import Variant, check_name, load_recipe, parse_step, unique, variant_name
from compressor.report import Report

PathLike = Union[str, "os.PathLike[str]"]  # noqa: UP007 - a string forward reference
#: ``"quantize dynamic"`` (one step), ``["prune 0.5", "quantize int8"]`` (steps of one
#: variant), or a mapping ``{"name": steps}``.
VariantsLike = str | Sequence[str | Sequence[str]] | Mapping[str, str | Sequence[str]]


def run(
    model: PathLike,
    variants: VariantsLike | None = None,
    *,
    data: PathLike | None = None,
    train_data: PathLike | None = None,
    calibration_data: PathLike | None = None,
    backend: str | None = None,
    out: PathLike | None = None,
    settings: Mapping[str, Any] | None = None,
    recipe: PathLike | None = None,
    trust: bool = False,
    force: bool = False,
    threads: int = 1,
    repeats: int = 1,
    max_examples: int | None = None,
    min_seconds: float = 0.5,
    max_accuracy_drop: float | None = None,
    min_agreement: float | None = None,
    min_cosine: float | None = None,
    check_space: bool = True,
    progress: ProgressCallback | None = None,
) -> Report:
    """Compress ``model`` into ``variants`` and measure each against the original.

    ``variants`` as in :data:`VariantsLike`; None makes the backend's default
    variants. ``settings`` are ``--set`` pairs (``{"epochs": 2}``).
    """
    chosen = parse_variants(variants) + (load_recipe(Path(recipe)) if recipe is not None else [])
    return _execute(
        model, unique(chosen), data=data, train_data=train_data, calibration_data=calibration_data,
        backend=backend, out=out, settings=settings, trust=trust, force=force, threads=threads,
        repeats=repeats, max_examples=max_examples, min_seconds=min_seconds,
        max_accuracy_drop=max_accuracy_drop, min_agreement=min_agreement, min_cosine=min_cosine,
        check_space=check_space,
        progress=progress,
    )


def measure(
    model: PathLike,
    *,
    data: PathLike | None = None,
    backend: str | None = None,
    out: PathLike | None = None,
    settings: Mapping[str, Any] | None = None,
    trust: bool = False,
    threads: int = 1,
    max_examples: int | None = None,
    min_seconds: float = 0.5,
) -> Report:
    """Measure ``model`` as it is (its one row is ``original``)."""
    return _execute(model, [], data=data, backend=backend, out=out, settings=settings, trust=trust,
                    threads=threads, max_examples=max_examples, min_seconds=min_seconds,
                    original_only=True)


def compare(*reports: Report | PathLike) -> Report:
    """Several runs side by side: reports, ``report.json`` files or run folders."""
    from compressor.merging import merge_reports

    paths = []
    for report in reports:
        if isinstance(report, Report):
            if report.folder is None:
                raise UsageError("this report has no folder on disk to compare from")
            paths.append(report.folder)
        else:
            paths.append(Path(report))
    return merge_reports(paths)


def search(
    model: PathLike,
    *,
    data: PathLike,
    objective: str = "size",
    max_accuracy_drop: float | None = None,
    min_agreement: float | None = None,
    min_cosine: float | None = None,
    max_trials: int = 20,
    time_budget_minutes: float | None = None,
    seed: int = 0,
    space: PathLike | None = None,
    out: PathLike | None = None,
    **run_options: Any,
) -> Report:
    """``compressor search``: the variant with the least ``objective`` within the budget
    (``report.settings["search"]["winner"]``; ``report.best(objective)`` picks it too).
    Raises BudgetError when no trial meets the budget. ``run_options`` as for :func:`run`."""
    from compressor.plugins import get_host
    from compressor.runner import RunRequest
    from compressor.searching import SearchRequest, check_limits
    from compressor.searching import search as run_search

    time_budget = time_budget_minutes * 60 if time_budget_minutes is not None else None
    check_limits(max_trials, time_budget)
    scratch = tempfile.TemporaryDirectory(prefix="compressor-api-") if out is None else None
    target = Path(scratch.name) / "out" if scratch is not None else Path(out)  # type: ignore[arg-type]
    settings = run_options.pop("settings", None)
    measure = MeasureSettings(threads=run_options.pop("threads", 1),
                              min_seconds=run_options.pop("min_seconds", 0.5))
    request = RunRequest(
        model=Path(model), out=target, data=Path(data), measure=measure,
        settings={str(k): str(v) for k, v in (settings or {}).items()},
        max_accuracy_drop=max_accuracy_drop, min_agreement=min_agreement, min_cosine=min_cosine,
        **{key: Path(value) if key.endswith("_data") and value is not None else value
           for key, value in run_options.items()},
    )
    try:
        report = run_search(
            SearchRequest(request, objective, max_trials, time_budget, seed, Path(space) if space is not None else None),
            get_host(), _silent)
    except BaseException:
        if scratch is not None:
            scratch.cleanup()
        raise
    report.attach_folder(target, scratch)
    return report


def parse_variants(variants: VariantsLike | None) -> list[Variant]:
    """Variants from the API's flexible forms (see :data:`VariantsLike`)."""
    if variants is None:
        return []
    if isinstance(variants, str):
        variants = [variants]
    if isinstance(variants, Mapping):
        # A name becomes a file name in the output folder: one safe component, as in recipes.
        return [Variant(check_name(name), _steps(steps)) for name, steps in variants.items()]
    parsed = []
    for item in variants:
        steps = _steps(item)
        parsed.append(Variant(variant_name(steps), steps))
    return parsed


def _steps(item: str | Iterable[str]) -> tuple[Any, ...]:
    texts = [item] if isinstance(item, str) else list(item) if isinstance(item, Iterable) else []
    if not texts or not all(isinstance(text, str) for text in texts):
        raise UsageError(f"a variant is a step string or a list of them, not {item!r}")
    return tuple(parse_step(text) for text in texts)


def _execute(model: PathLike, variants: list[Variant], *, out: PathLike | None = None,
             settings: Mapping[str, Any] | None = None, threads: int = 1, max_examples: int | None = None,
             min_seconds: float = 0.5, progress: ProgressCallback | None = None, **fields: Any) -> Report:
    from compressor.plugins import get_host
    from compressor.runner import RunRequest
    from compressor.runner import run as run_request

    scratch = None
    if out is None:
        scratch = tempfile.TemporaryDirectory(prefix="compressor-api-")
        out = Path(scratch.name) / "out"
    paths = {key: Path(value) if value is not None else None
             for key, value in fields.items() if key in ("data", "train_data", "calibration_data")}
    other = {key: value for key, value in fields.items() if key not in paths}
    request = RunRequest(
        model=Path(model), out=Path(out), variants=variants,
        settings={str(key): str(value) for key, value in (settings or {}).items()},
        measure=MeasureSettings(threads=threads, max_examples=max_examples, min_seconds=min_seconds),
        **paths, **other,
    )
    try:
        report = run_request(request, get_host(), progress or _silent)
    except BaseException:
        if scratch is not None:
            scratch.cleanup()
        raise
    report.attach_folder(Path(out), scratch)
    return report


def _silent(message: str, fraction: float | None) -> None:
    return None
