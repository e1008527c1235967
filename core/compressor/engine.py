"""Core's measurement of a backend's :class:`~compressor.runtime.Runtime`, in the measuring process.

The same for every backend, in this order:

1. the runtime is opened (timed by the worker, its framework already imported);
2. batch-1 latency on the first example (warm-up, then timed calls);
3. every evaluation example through the runtime at the evaluation batch (1 by
   default, ``--set eval_batch=N``), all outputs kept; a stateful model
   (``--set state.OUT=IN``) runs example by example with its state carried;
   ``peak_rss_bytes`` is read here, so it is the memory at that batch;
4. throughput at ``settings.batch_size`` (``latency_batch_ms``), at fewer rows
   where that would not fit the batch timing's time budget, and the peak memory at
   that batch (``peak_rss_batch_bytes``), when the model takes it;
5. with evaluation data, the runtime's own figures on it (:meth:`Runtime.evaluate`);
6. each output's task is detected (``compressor.tasks``) and what the parent
   needs to compare it is kept;
7. for a variant, with the original's runtime opened beside it by the measuring
   process, the ratio of their batch-1 latencies to a stated precision
   (:func:`latency_against`).

A repeat (``settings.timing_only``) times again (2 and 4, and 7) and measures nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from compressor import tasks
from compressor.errors import CompressorError, InvalidInputError
from compressor.feeding import Examples, examples_from_data, state_links, synthetic_examples
from compressor.measuring import time_batch, time_calls
from compressor.memory import peak_rss_bytes
from compressor.models import Dataset, MeasureSettings
from compressor.runtime import Runtime


@dataclass
class RuntimeMeasurement:
    metrics: dict[str, Any] = field(default_factory=dict)
    #: ``{output: {"task", "reason", "shape"}}`` for every output compared.
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ``{output: {kind: array}}``: what :func:`compressor.tasks.keep` kept.
    kept: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The feeds batch-1 latency was timed on (:func:`latency_against` times them again).
    first_example: dict[str, Any] = field(default_factory=dict)


def measure_runtime(runtime: Runtime, data: Dataset | None, settings: MeasureSettings) -> RuntimeMeasurement:
    options = settings.options
    source = data.path if data is not None else None
    if data is not None:
        examples = examples_from_data(data, runtime.inputs, options, settings.max_examples)
    else:
        examples = synthetic_examples(runtime.inputs, options)
    examples.state = state_links(runtime.inputs, runtime.outputs, options)
    fixed = runtime.fixed_batch
    single = examples.take(0, 1, pad_to=fixed)
    _run(runtime, single, source)
    measured = RuntimeMeasurement(first_example=single)
    metrics = measured.metrics
    metrics["latency_ms"] = time_calls(lambda: runtime.run(single), settings, fixed or 1)
    if settings.timing_only:  # a repeat: the timings again, fidelity and memory were measured once
        if fixed is None and not examples.state:
            _time_batch(runtime, examples, settings, metrics, memory=False)
        metrics.update(runtime.metrics())
        return measured
    eval_batch = fixed or (1 if examples.state else max(1, int(options.get("eval_batch") or 1)))
    records, compared_count = _run_all(runtime, examples, eval_batch, fixed, source)
    metrics["eval_batch"] = eval_batch
    if compared_count < examples.count:
        metrics["compared_examples"] = compared_count
    metrics["peak_rss_bytes"] = peak_rss_bytes()
    if fixed is not None:
        metrics["fixed_batch"] = fixed
    elif not examples.state:
        _time_batch(runtime, examples, settings, metrics)
    metrics.update(runtime.metrics())
    if data is not None:
        # The backend's own figures against the labels (fastText's precision@k); they stand
        # where core's comparison has a figure of the same name.
        metrics.update(runtime.evaluate(data))
    wanted = _wanted_outputs(runtime, options)
    feeds = {name: array[:compared_count] for name, array in examples.arrays.items() if examples.axes[name] == 0}
    positions = {spec.name: index for index, spec in enumerate(runtime.outputs)}
    by_name = {spec.name: spec for spec in runtime.outputs}
    # In the order asked for; every output's task is decided with the others in view.
    compared = [by_name[name] for name in wanted if name not in examples.state and name in records]
    measured.outputs, measured.kept = tasks.examine(compared, records, runtime.inputs, options, feeds, positions)
    return measured


def first_example(runtime: Runtime, data: Dataset | None, settings: MeasureSettings) -> dict[str, Any]:
    """The feeds batch-1 latency is timed on: the first example of ``data`` (else synthetic)
    as ``runtime`` takes it, padded to its fixed batch."""
    options = settings.options
    if data is not None:
        examples = examples_from_data(data, runtime.inputs, options, settings.max_examples)
    else:
        examples = synthetic_examples(runtime.inputs, options)
    examples.state = state_links(runtime.inputs, runtime.outputs, options)
    return examples.take(0, 1, pad_to=runtime.fixed_batch)


def latency_against(runtime: Runtime, feeds: Mapping[str, Any], original: Runtime, data: Dataset | None,
                    settings: MeasureSettings) -> dict[str, Any]:
    """``runtime`` (a variant, on ``feeds``) timed against the ``original``'s runtime in
    interleaved blocks until their ratio is known to ``settings.precision``
    (:func:`compressor.latency_interval.interleave`): the ``latency_ratio`` fields."""
    from compressor.latency_interval import interleave

    original_feeds = first_example(original, data, settings)
    _run(original, original_feeds, data.path if data is not None else None)
    return interleave(lambda: runtime.run(feeds), lambda: original.run(original_feeds), settings,
                      rows=(runtime.fixed_batch or 1, original.fixed_batch or 1))


def _wanted_outputs(runtime: Runtime, options: Mapping[str, Any]) -> list[str]:
    names = [spec.name for spec in runtime.outputs]
    chosen = [name.strip() for name in str(options.get("outputs") or "").split(",") if name.strip()]
    unknown = [name for name in chosen if name not in names]
    if unknown:
        from compressor.errors import UsageError

        raise UsageError(f"--set outputs names {', '.join(unknown)}, but the model's outputs are "
                         f"{', '.join(names)}")
    return chosen or names


#: Exceptions that, raised in the plugin's own code, are a bug there rather than a refusal of the data.
PLUGIN_BUGS = (AttributeError, NameError, AssertionError, NotImplementedError, TypeError, KeyError, IndexError,
               ZeroDivisionError, RecursionError)


def _run(runtime: Runtime, feeds: Mapping[str, Any], source: Any) -> Mapping[str, Any]:
    """One call. A runtime that refuses the data (a framework's own exception) is a data
    problem (exit 4); a Python error raised in the plugin's own code is a bug in it (exit 1).
    Either keeps its cause, which the measuring process prints (``--debug`` shows it)."""
    try:
        return runtime.run(feeds)
    except CompressorError as error:
        if error.path is None and source is not None:
            error.path = source  # a runtime's refusal of the data names the data file
        raise
    except Exception as error:  # noqa: BLE001 - runtimes raise their own exception types
        from compressor.errors import first_line

        kind = type(runtime)
        if isinstance(error, PLUGIN_BUGS) and _raised_in(error, (kind.__module__.split(".")[0], Runtime.__module__)):
            raise CompressorError(
                f"{kind.__module__}.{kind.__qualname__}.run raised {type(error).__name__}: {first_line(error)} "
                "(a bug in the plugin; rerun with --debug for its traceback)"
            ) from error
        shapes = ", ".join(f"{name} {list(getattr(array, 'shape', ()))}" for name, array in feeds.items())
        raise InvalidInputError(
            f"the runtime refused the inputs ({shapes}): {first_line(error)}", source
        ) from error


def _raised_in(error: BaseException, packages: tuple[str, ...]) -> bool:
    """Whether ``error`` was raised in a module of one of ``packages`` (its innermost Python frame)."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    module = str(frame.tb_frame.f_globals.get("__name__", "")) if frame is not None else ""
    return any(module == package or module.startswith(f"{package}.") for package in packages)


#: Output values the comparison holds in memory at most (1 GiB of float32): a language model's
#: logits are ``tokens x vocabulary`` per example (27 M values for 863 tokens of a 32,000-token
#: vocabulary), so 300 examples would take 33 GB. Counted in values, not bytes, so that every
#: variant (fp16 outputs too) is compared on the same examples.
MAX_RETAINED_VALUES = 1 << 28


def _run_all(runtime: Runtime, examples: Examples, batch: int, fixed: int | None,
             source: Any) -> tuple[dict[str, Any | None], int]:
    """Every example's outputs, stacked along a new first axis per output (None when
    an output's shape varies between examples), and how many examples that is: the first
    ones whose outputs fit in :data:`MAX_RETAINED_VALUES` (at least one batch)."""
    import numpy as np

    pieces: dict[str, list[Any]] = {spec.name: [] for spec in runtime.outputs}
    previous: Mapping[str, Any] = {}
    retained, done = 0, 0
    for start in range(0, examples.count, batch):
        stop = min(start + batch, examples.count)
        if start and not examples.state and retained + retained // start * (stop - start) > MAX_RETAINED_VALUES:
            break
        feeds = examples.take(start, stop, pad_to=fixed)
        for output, target in examples.state.items():
            if output in previous:
                feeds[target] = previous[output]
        previous = _run(runtime, feeds, source)
        rows = stop - start
        for name, value in previous.items():
            if name not in pieces:
                continue
            array = np.asarray(value)
            if array.ndim and array.shape[0] == (fixed or rows):
                pieces[name].extend(array[:rows])
                retained += array[:rows].size
            else:
                pieces[name].append(array)
                retained += array.size
        done = stop
    stacked: dict[str, Any | None] = {}
    for name, parts in pieces.items():
        shapes = {part.shape for part in parts}
        stacked[name] = _stacked(parts) if len(shapes) == 1 and parts else None
    return stacked, done


def _stacked(parts: list[Any]) -> Any:
    """``np.stack(parts)``, each part let go once copied: the held outputs (up to
    :data:`MAX_RETAINED_VALUES`) are in memory once, not twice, at the end."""
    import numpy as np

    whole = np.empty((len(parts), *parts[0].shape), dtype=np.result_type(*{part.dtype for part in parts}))
    for index in range(len(parts)):
        whole[index] = parts[index]
        parts[index] = None
    return whole


def _time_batch(runtime: Runtime, examples: Examples, settings: MeasureSettings,
                metrics: dict[str, Any], memory: bool = True) -> None:
    """Throughput at ``settings.batch_size`` (examples repeated to fill it), or at fewer rows
    where that batch would not fit the time budget (``compressor.measuring.time_batch``),
    and the memory it takes."""
    import numpy as np

    def call_at(rows: int) -> Any:
        order = np.resize(np.arange(examples.count), rows)
        batch = {}
        for name, array in examples.arrays.items():
            axis = examples.axes[name]
            batch[name] = array if axis is None else np.ascontiguousarray(np.take(array, order, axis=axis))
        return lambda: runtime.run(batch)

    timing = time_batch(call_at, settings, metrics["latency_ms"]["p50"])
    metrics.update(timing)
    if "latency_batch_ms" in timing and memory:
        metrics["peak_rss_batch_bytes"] = peak_rss_bytes()
