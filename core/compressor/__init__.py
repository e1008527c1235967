"""compressor: compress a trained model several ways and measure what changed.

From Python (docs/python-api.md)::

    import compressor
    report = compressor.run("model.onnx", ["quantize dynamic", "quantize fp16"], data="eval.npz")
    report.to_pandas()

The public API for plugin authors is :mod:`compressor.plugin` (its ``__all__`` is the
contract; the names below stay importable from here too), and :mod:`compressor.testing`
checks a backend against it::

    from compressor.plugin import hookimpl, Backend, Technique, Param, Model, Artifact, Runtime, ...

Importing this package imports no ML framework.
"""

from __future__ import annotations

from compressor.errors import (
    BudgetError,
    CompressionError,
    CompressorError,
    InvalidInputError,
    UnsafeInputError,
    UnsupportedError,
    UsageError,
)
from compressor.hookspecs import hookimpl
from compressor.measuring import Stopwatch, time_calls
from compressor.models import (
    Artifact,
    Context,
    Dataset,
    Measurement,
    MeasureSettings,
    Model,
    SampleModel,
    Step,
    TensorSpec,
)
from compressor.runtime import Runtime
from compressor.specs import (
    EVERY_STEP,
    PQ,
    PRUNE,
    QUANTIZE,
    QUANTIZE_MODES,
    Backend,
    Param,
    Technique,
)
from compressor.version import __version__

__all__ = [
    "PQ",
    "EVERY_STEP",
    "PathLike",
    "Report",
    "VariantResult",
    "VariantsLike",
    "PRUNE",
    "QUANTIZE",
    "QUANTIZE_MODES",
    "Artifact",
    "Backend",
    "BudgetError",
    "CompressionError",
    "CompressorError",
    "Context",
    "Dataset",
    "InvalidInputError",
    "MeasureSettings",
    "Measurement",
    "Model",
    "Param",
    "Runtime",
    "SampleModel",
    "Stopwatch",
    "Step",
    "Technique",
    "TensorSpec",
    "UnsafeInputError",
    "UnsupportedError",
    "UsageError",
    "__version__",
    "compare",
    "hookimpl",
    "measure",
    "run",
    "search",
    "time_calls",
]


#: The Python API (:mod:`compressor.api`), imported on first use: ``compressor.run`` etc.
_API = ("run", "measure", "compare", "search", "Report", "VariantResult", "VariantsLike", "PathLike")


def __getattr__(name: str) -> object:
    """``compressor.run``, ``measure``, ``compare``, ``search``, ``Report``..., imported on first use."""
    if name in _API:
        from compressor import api

        return getattr(api, name)
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")


def __dir__() -> list[str]:
    """What ``dir(compressor)`` and ``help(compressor)`` list: the lazily imported API too."""
    return sorted({*globals(), *_API})
