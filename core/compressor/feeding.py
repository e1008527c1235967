"""From a data file to a runtime's inputs: names, dtypes, batch axes, scalars, state.

Every input has a batch axis, 0 unless ``--set batch_axis.NAME=K`` says
otherwise (a recurrent state is often ``[layers, batch, hidden]``: axis 1), or
none: a 0-d array in the data (a sample rate) or ``batch_axis.NAME=none`` is
the same value for every call. ``--set state.OUT=IN`` makes a stateful model
(a voice-activity detector, a streaming recogniser) run example by example,
each call's output ``OUT`` fed to the next call's input ``IN``; the data's
array for ``IN`` is the initial state (no batch axis unless declared, or one
entry per example along a dynamic first axis). Calibration feeds the same
way (the onnx backend's static quantization).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from compressor.errors import InvalidInputError, UsageError
from compressor.models import Dataset, TensorSpec

#: Size of a dynamic, non-batch axis in synthetic inputs (a sequence of tokens, an image side).
SYNTHETIC_AXIS = 128
#: The dtype a runtime declares for a text input (fed as an object array of Python strings).
TEXT_DTYPE = "str"
#: What a synthetic text input holds (latency without evaluation data).
SYNTHETIC_TEXT = "the quick brown fox jumps over the lazy dog"
BATCH_AXIS_PREFIX, STATE_PREFIX = "batch_axis.", "state."


@dataclass
class Examples:
    """Per-input arrays with the axis their examples run along (None: the same every call)."""

    arrays: dict[str, Any]
    axes: dict[str, int | None]
    count: int
    #: ``{output name: input name}``: outputs fed back as the next call's input.
    state: dict[str, str] = field(default_factory=dict)

    def take(self, start: int, stop: int, pad_to: int | None = None) -> dict[str, Any]:
        """Examples ``start`` to ``stop`` as one batch of feeds (padded to ``pad_to`` rows)."""
        import numpy as np

        feeds = {}
        for name, array in self.arrays.items():
            axis = self.axes[name]
            if axis is None:
                feeds[name] = array
                continue
            rows = np.take(array, np.arange(start, min(stop, self.count)), axis=axis)
            if pad_to is not None and rows.shape[axis] < pad_to:
                repeats = np.resize(np.arange(rows.shape[axis]), pad_to)
                rows = np.take(rows, repeats, axis=axis)
            feeds[name] = np.ascontiguousarray(rows)
        return feeds


def batch_axes(inputs: Sequence[TensorSpec], options: Mapping[str, Any]) -> dict[str, int | None]:
    """Each input's declared batch axis (``batch_axis.NAME``), default 0; rank-0 inputs have
    none, and neither has a state input (``state.OUT=NAME``): its data is the initial state
    (:func:`examples_from_data` gives it axis 0 back when the data holds one per example)."""
    axes: dict[str, int | None] = {}
    names = {spec.name for spec in inputs}
    states = state_inputs(options)
    for key in options:
        if key.startswith(BATCH_AXIS_PREFIX) and key[len(BATCH_AXIS_PREFIX):] not in names:
            raise UsageError(f"--set {key}: the model has no input {key[len(BATCH_AXIS_PREFIX):]!r}; "
                             f"its inputs are {', '.join(sorted(names))}")
    for spec in inputs:
        declared = options.get(f"{BATCH_AXIS_PREFIX}{spec.name}")
        if declared is None:
            axes[spec.name] = None if spec.shape == () or spec.name in states else 0
        elif str(declared).lower() == "none":
            axes[spec.name] = None
        else:
            try:
                axes[spec.name] = int(declared)
            except ValueError:
                raise UsageError(f"--set {BATCH_AXIS_PREFIX}{spec.name}={declared!r}: an axis number or none") from None
    return axes


def state_inputs(options: Mapping[str, Any]) -> set[str]:
    """The inputs that ``state.OUT=IN`` options feed from an output."""
    return {str(value) for key, value in options.items() if key.startswith(STATE_PREFIX)}


def with_batch_axes(inputs: Sequence[TensorSpec], options: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
    """``inputs`` with each one's batch axis from the options (rank-0 inputs have none)."""
    from dataclasses import replace

    axes = batch_axes(inputs, options)
    return tuple(replace(spec, batch_axis=axes[spec.name]) for spec in inputs)


def state_links(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                options: Mapping[str, Any]) -> dict[str, str]:
    """``state.OUT=IN`` pairs, checked against the runtime's names."""
    links = {key[len(STATE_PREFIX):]: str(value) for key, value in options.items() if key.startswith(STATE_PREFIX)}
    input_names, output_names = {s.name for s in inputs}, {s.name for s in outputs}
    for output, source in links.items():
        if output not in output_names:
            raise UsageError(f"--set state.{output}: the model has no output {output!r}; "
                             f"its outputs are {', '.join(sorted(output_names))}")
        if source not in input_names:
            raise UsageError(f"--set state.{output}={source}: the model has no input {source!r}")
    return links


def examples_from_data(dataset: Dataset, inputs: Sequence[TensorSpec], options: Mapping[str, Any],
                       limit: int | None = None) -> Examples:
    """The data's arrays matched to the runtime's inputs, cast, cut to ``limit`` examples."""
    import numpy as np

    features = dataset.features
    if not isinstance(features, Mapping):
        raise UsageError("the backend read this data as no named arrays (Dataset.features must map each "
                         "input's name to its array)", dataset.path)
    if len(inputs) == 1 and inputs[0].name not in features and len(features) == 1:
        features = {inputs[0].name: next(iter(features.values()))}
    axes = batch_axes(inputs, options)
    arrays: dict[str, Any] = {}
    missing = []
    for spec in inputs:
        if spec.name not in features:
            if not spec.optional:  # an optional input the data lacks: the runtime has its default
                missing.append(spec.name)
            continue
        array = np.asarray(features[spec.name])
        if array.ndim == 0:
            axes[spec.name] = None
        dtype = _numpy_dtype(spec.dtype)
        arrays[spec.name] = array.astype(dtype, copy=False) if dtype is not None else array
    if missing:
        raise InvalidInputError(
            f"has no array for the model input(s) {', '.join(missing)} (it has {', '.join(sorted(features))})",
            dataset.path,
        )
    counts = {}
    for name, array in arrays.items():
        axis = axes[name]
        if axis is None:
            continue
        if axis >= array.ndim:
            raise InvalidInputError(
                f"array {name!r} has {array.ndim} axes, so it cannot run along axis {axis}", dataset.path
            )
        counts[name] = array.shape[axis]
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{name}: {count}" for name, count in counts.items())
        raise InvalidInputError(
            f"inputs have different numbers of examples ({shown}); set the batch axis of an input "
            "that is not one row per example with --set batch_axis.NAME=K (or =none)",
            dataset.path,
        )
    count = next(iter(counts.values()), 1)
    _per_example_states(inputs, options, arrays, axes, count if counts else None)
    if limit is not None and count > limit:
        for name, axis in axes.items():
            if axis is not None:
                arrays[name] = np.take(arrays[name], np.arange(limit), axis=axis)
        count = limit
    return Examples(arrays, axes, count)


def _per_example_states(inputs: Sequence[TensorSpec], options: Mapping[str, Any], arrays: dict[str, Any],
                        axes: dict[str, int | None], count: int | None) -> None:
    """A state input left without a declared axis runs along axis 0 when its first dimension is
    dynamic in the model and holds one entry per example; otherwise (``[layers, 1, hidden]``, a
    first dimension the model fixes, another length) it is the initial state, fed as it is."""
    if count is None:
        return
    states = state_inputs(options)
    for spec in inputs:
        array = arrays.get(spec.name)
        if (spec.name not in states or f"{BATCH_AXIS_PREFIX}{spec.name}" in options or array is None
                or array.ndim == 0 or not spec.shape or spec.shape[0] is not None):
            continue
        if array.shape[0] == count:
            axes[spec.name] = 0


def synthetic_examples(inputs: Sequence[TensorSpec], options: Mapping[str, Any], seed: int = 0) -> Examples:
    """One example of each input: small random floats, ones for integer inputs (valid token
    ids and masks), :data:`SYNTHETIC_TEXT` for text inputs, dynamic axes 1 (batch) or
    :data:`SYNTHETIC_AXIS`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    axes = batch_axes(inputs, options)
    arrays = {}
    for spec in inputs:
        shape = tuple(
            (1 if axis == axes[spec.name] else SYNTHETIC_AXIS) if size is None else size
            for axis, size in enumerate(spec.shape)
        )
        if spec.dtype == TEXT_DTYPE:
            arrays[spec.name] = np.full(shape, SYNTHETIC_TEXT, dtype=object)
            continue
        dtype = _numpy_dtype(spec.dtype) or np.dtype("float32")
        if dtype.kind in "iub":
            arrays[spec.name] = np.ones(shape, dtype=dtype)
        else:
            arrays[spec.name] = rng.standard_normal(shape).astype(dtype)
    return Examples(arrays, axes, 1)


def _numpy_dtype(name: str) -> Any | None:
    import numpy as np

    try:
        dtype = np.dtype(name)
    except TypeError:
        return None
    return None if dtype.kind in "OSUV" else dtype
