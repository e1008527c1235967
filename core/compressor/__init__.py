"""compressor: compress a trained model several ways and measure what changed.

The public API for plugin authors::

    from compressor import hookimpl, Backend, Technique, Param, Model, Artifact, ...

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
from compressor.specs import PQ, PRUNE, QUANTIZE, QUANTIZE_MODES, Backend, Param, Technique

__version__ = "0.1.0"

__all__ = [
    "PQ",
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
    "SampleModel",
    "Stopwatch",
    "Step",
    "Technique",
    "TensorSpec",
    "UnsafeInputError",
    "UnsupportedError",
    "UsageError",
    "__version__",
    "hookimpl",
    "time_calls",
]
