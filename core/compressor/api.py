"""The Python API: what the CLI does, from a script or a notebook cell.

Every example in this module runs as written, as one session in this order (the test
suite runs them: tests/test_api_docs.py). A small digits classifier to try it on, a
PyTorch ``state_dict`` rebuilt by ``model_factory``:

>>> import tempfile
>>> import compressor
>>> from compressor_onnx.samples import FACTORY, write_digits_sample
>>> folder = tempfile.mkdtemp()                       # a str or a Path, everywhere
>>> weights, eval_data, calibration = write_digits_sample(folder)
>>> report = compressor.run(weights, ["quantize dynamic", "quantize fp16"], data=eval_data,
...                         settings={"model_factory": FACTORY}, min_seconds=0.05)
>>> report                                            # in a notebook: the comparison table
<Report of digits_mlp.pt on onnx: original, dynamic, fp16 in ...>
>>> best = report.best("size", min_agreement=0.95)    # the smallest within the bound, or None
>>> best.artifact_path.suffix                         # the file to deploy
'.onnx'

Without ``out``, artifacts and reports live in a temporary folder that the
returned :class:`~compressor.report.Report` owns (removed when the report is
garbage-collected or :meth:`~compressor.report.Report.cleanup` is called);
with ``out`` they are written there as by ``compressor run --out``. Paths are
``str`` or ``os.PathLike``. Errors are the
:class:`~compressor.errors.CompressorError` hierarchy, as on the command line,
with the same messages. ``report.to_pandas()`` is the table as a DataFrame (needs
pandas).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from compressor.errors import UsageError
from compressor.models import MeasureSettings, ProgressCallback, Step, default_min_seconds
from compressor.recipes import Variant, check_name, load_recipe, parse_step, unique, variant_name
from compressor.report import Report, VariantResult

__all__ = ["PathLike", "Report", "VariantResult", "VariantsLike", "compare", "measure", "run", "search"]

#: A path: a ``str`` or an ``os.PathLike`` (``pathlib.Path``).
PathLike = Union[str, "os.PathLike[str]"]  # noqa: UP007 - a string forward reference
#: The variants to make: ``"quantize dynamic"`` (one variant of one step); a list whose
#: items are step strings (a variant each) or lists of them (a variant of several steps:
#: ``["prune 0.5", "quantize int8"]``); or a mapping ``{"name": steps}``.
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
    min_seconds: float | None = None,
    precision: float = 0.03,
    max_seconds: float = 60.0,
    max_accuracy_drop: float | None = None,
    min_agreement: float | None = None,
    min_cosine: float | None = None,
    check_space: bool = True,
    progress: ProgressCallback | None = None,
) -> Report:
    """Compress ``model`` into ``variants`` and measure each against the original.

    ``variants``: ``"quantize dynamic"`` (one variant), a list of step strings (a variant
    each) or of lists of them (a variant of several steps), or ``{"name": steps}``
    (``compressor.VariantsLike``); None makes the backend's default variants.
    ``settings`` are ``--set`` pairs (``{"epochs": 2}``); ``progress`` is called as
    ``progress(message, share)``, ``share`` the part of the whole run done (0 to 1).
    Every refusal (a step, a parameter, missing data, an unknown option) comes before
    any work. The paths are ``str`` or ``os.PathLike``. ``precision``: each variant is
    timed against the original until the 95% interval of their latency ratio is within
    +-``precision`` (0: ``min_seconds`` only), for at most ``max_seconds``; ``min_seconds``
    None: ``COMPRESSOR_MIN_SECONDS`` where it is set, else 0.5.

    >>> heard = []
    >>> pruned = compressor.run(weights, {"small": ["prune 0.5", "quantize dynamic"]}, data=eval_data,
    ...                         settings={"model_factory": FACTORY}, out=f"{folder}/pruned", min_seconds=0.05,
    ...                         progress=lambda message, share: heard.append(share))
    >>> pruned.variant("small").steps
    ['prune 0.5', 'quantize dynamic']
    >>> heard[-1]
    1.0
    >>> sorted(path.name for path in pruned.folder.iterdir() if path.suffix == ".onnx")
    ['original.onnx', 'small.onnx']
    """
    chosen = parse_variants(variants) + (load_recipe(Path(recipe)) if recipe is not None else [])
    return _execute(
        model, unique(chosen), data=data, train_data=train_data, calibration_data=calibration_data,
        backend=backend, out=out, settings=settings, trust=trust, force=force, threads=threads,
        repeats=repeats, max_examples=max_examples, min_seconds=min_seconds,
        precision=precision, max_seconds=max_seconds, max_accuracy_drop=max_accuracy_drop, min_agreement=min_agreement, min_cosine=min_cosine,
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
    min_seconds: float | None = None,
    progress: ProgressCallback | None = None,
) -> Report:
    """Measure ``model`` as it is (its one row is ``original``); ``progress`` as for :func:`run`.

    >>> measured = compressor.measure(weights, data=eval_data, settings={"model_factory": FACTORY},
    ...                               out=f"{folder}/measured", min_seconds=0.05)
    >>> [variant.name for variant in measured.variants]
    ['original']
    >>> measured.variants[0].metrics["accuracy"] > 0.9
    True
    """
    return _execute(model, [], data=data, backend=backend, out=out, settings=settings, trust=trust,
                    threads=threads, max_examples=max_examples, min_seconds=min_seconds,
                    original_only=True, progress=progress)


def compare(*reports: Report | PathLike) -> Report:
    """Several runs side by side: reports, ``report.json`` files or run folders (``str`` or
    ``os.PathLike``), as ``compressor compare``; "smaller" is relative to the first original.

    >>> merged = compressor.compare(report, f"{folder}/measured")
    >>> [variant.name for variant in merged.variants]
    ['out:original', 'out:dynamic', 'out:fp16', 'measured:original']
    """
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
    (``report.settings["search"]["winner"]``, copied to ``best.<ext>`` in the report's folder).
    Raises BudgetError when no trial meets the budget. ``run_options`` as for :func:`run`
    (``progress`` too: the share is of ``max_trials``). Needs Optuna:
    ``pip install 'compressor[search]'``.

    >>> found = compressor.search(weights, data=eval_data, max_accuracy_drop=2, max_trials=1,
    ...                           settings={"model_factory": FACTORY}, min_seconds=0.05)
    >>> [variant.name for variant in found.variants]     # the original, then each trial
    ['original', 'fp16']
    >>> found.settings["search"]["winner"]
    'fp16'
    >>> (found.folder / "best.onnx").is_file()           # the winner, to deploy
    True
    >>> found.cleanup()
    """
    from compressor.plugins import get_host
    from compressor.run_request import RunRequest
    from compressor.searching import SearchRequest, check_limits
    from compressor.searching import search as run_search

    time_budget = time_budget_minutes * 60 if time_budget_minutes is not None else None
    check_limits(max_trials, time_budget)
    scratch = tempfile.TemporaryDirectory(prefix="compressor-api-") if out is None else None
    target = Path(scratch.name) / "out" if scratch is not None else Path(out)  # type: ignore[arg-type]
    settings = run_options.pop("settings", None)
    progress = run_options.pop("progress", None) or _silent
    min_seconds = run_options.pop("min_seconds", None)
    measure = MeasureSettings(threads=run_options.pop("threads", 1),
                              min_seconds=default_min_seconds() if min_seconds is None else min_seconds)
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
            get_host(), progress)
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


def _steps(item: str | Iterable[str]) -> tuple[Step, ...]:
    texts = [item] if isinstance(item, str) else list(item) if isinstance(item, Iterable) else []
    if not texts or not all(isinstance(text, str) for text in texts):
        raise UsageError(f"a variant is a step string or a list of them, not {item!r}")
    return tuple(parse_step(text) for text in texts)


def _execute(model: PathLike, variants: list[Variant], *, out: PathLike | None = None,
             settings: Mapping[str, Any] | None = None, threads: int = 1, max_examples: int | None = None,
             min_seconds: float | None = None, precision: float = 0.03, max_seconds: float = 60.0,
             progress: ProgressCallback | None = None, **fields: Any) -> Report:
    from compressor.plugins import get_host
    from compressor.run_request import RunRequest
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
        measure=MeasureSettings(threads=threads, max_examples=max_examples,
                                min_seconds=default_min_seconds() if min_seconds is None else min_seconds,
                                precision=_checked_precision(precision), max_seconds=_checked_seconds(max_seconds)),
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


def _checked_precision(precision: float) -> float:
    from compressor.latency_interval import parse_precision

    return parse_precision(str(precision))


def _checked_seconds(seconds: float) -> float:
    from compressor.latency_interval import parse_max_seconds

    return parse_max_seconds(str(seconds))
