"""Model inputs: the ``input_shape`` option and sample inputs for export.

``--set input_shape=`` takes one entry per input, separated by ``;``::

    1,64                                     one float32 input named x
    x:1,1,8,8                                named
    input_ids:1,128:int64;attention_mask:1,128:int64

The batch axis (axis 0) is always dynamic in the exported graph; integer
inputs of rank 2 or more (token ids, masks) also get a dynamic sequence axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compressor.plugin import Dataset, TensorSpec, UsageError

DEFAULT_INPUT_NAME = "x"
_DTYPES = ("float32", "float16", "float64", "int64", "int32", "bool")


@dataclass(frozen=True)
class SampleShape:
    """One declared input: a name, a concrete example shape and a dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, dynamic_shape(self.shape, self.dtype), self.dtype)


def parse_input_shape(text: str) -> tuple[SampleShape, ...]:
    """Parse the ``input_shape`` option (see the module docstring)."""
    entries = [entry.strip() for entry in text.split(";") if entry.strip()]
    if not entries:
        raise UsageError("input_shape is empty; e.g. --set input_shape=1,64")
    parsed = []
    for entry in entries:
        parts = entry.split(":")
        if len(parts) == 1:
            name, dims, dtype = DEFAULT_INPUT_NAME if len(entries) == 1 else "", parts[0], "float32"
        elif len(parts) == 2:
            name, dims, dtype = parts[0], parts[1], "float32"
        elif len(parts) == 3:
            name, dims, dtype = parts
        else:
            raise UsageError(f"input_shape entry {entry!r} is not NAME:DIMS[:DTYPE]")
        name, dtype = name.strip(), dtype.strip()
        if not name:
            raise UsageError(f"input_shape entry {entry!r} needs a name when there are several inputs")
        if dtype not in _DTYPES:
            raise UsageError(f"input_shape dtype {dtype!r} is not one of: {', '.join(_DTYPES)}")
        try:
            shape = tuple(int(dim) for dim in dims.split(","))
        except ValueError:
            raise UsageError(f"input_shape dims {dims!r} are not comma-separated integers") from None
        if not shape or any(dim < 1 for dim in shape):
            raise UsageError(f"input_shape dims {dims!r} must be positive integers")
        parsed.append(SampleShape(name, shape, dtype))
    return tuple(parsed)


def dynamic_shape(shape: tuple[int, ...], dtype: str) -> tuple[int | None, ...]:
    """The shape with the exported graph's dynamic axes set to None."""
    dynamic = sequence_axes(len(shape), dtype)
    return tuple(None if axis in dynamic else dim for axis, dim in enumerate(shape))


def sequence_axes(rank: int, dtype: str) -> tuple[int, ...]:
    """Dynamic axes: batch always, sequence too for integer (token) inputs."""
    if rank >= 2 and dtype.startswith(("int", "uint")):
        return (0, 1)
    return (0,) if rank else ()


def sample_from_data(dataset: Dataset, names: tuple[str, ...], rows: int = 1) -> dict[str, Any]:
    """The first ``rows`` examples of ``dataset`` as export inputs, keyed by input name."""
    features = dataset.features
    if len(names) == 1 and names[0] not in features and len(features) == 1:
        return {names[0]: next(iter(features.values()))[:rows]}
    missing = [name for name in names if name not in features]
    if missing:
        raise UsageError(
            f"the data file has no array for the input(s) {', '.join(missing)}", dataset.path
        )
    return {name: features[name][:rows] for name in names}


def synthetic_inputs(shapes: tuple[SampleShape, ...], seed: int = 0) -> dict[str, Any]:
    """Inputs of the declared shapes: small random floats, ones for integer inputs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = {}
    for sample in shapes:
        if sample.dtype.startswith(("int", "uint", "bool")):
            arrays[sample.name] = np.ones(sample.shape, dtype=sample.dtype)
        else:
            arrays[sample.name] = rng.standard_normal(sample.shape).astype(sample.dtype)
    return arrays
