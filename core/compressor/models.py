"""The objects that travel through the hooks: models, data, steps, artifacts, measurements."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.vocabulary import shared_declaration


@dataclass(frozen=True)
class Step:
    """One compression step, e.g. ``Step("prune", {"sparsity": 0.8, "epochs": 2})``.

    Once validated, ``params`` holds every parameter the backend declares a
    default for; ``defaulted`` names those the user did not give (left out of
    the step's text and file name)."""

    technique: str
    params: Mapping[str, Any] = field(default_factory=dict)
    defaulted: frozenset[str] = frozenset()
    #: The parameter written bare after the technique (``prune 0.8``: sparsity), as the
    #: technique declares it (``Technique.positional``); unset, a step's ``mode`` is.
    positional: str | None = field(default=None, compare=False)

    @property
    def mode(self) -> str | None:
        return self.params.get("mode")

    @property
    def positional_param(self) -> str | None:
        """The parameter :meth:`__str__` writes bare, when the step has it: the declared one,
        else the shared vocabulary's (``prune``: sparsity), else ``mode``."""
        shared = shared_declaration(self.technique, self.params, "mode" in self.params).get("positional")
        name = self.positional or shared or ("mode" if "mode" in self.params else None)
        return name if name in self.params else None

    def __str__(self) -> str:
        positional = self.positional_param
        words = [self.technique]
        if positional:
            words.append(_format_value(self.params[positional]))
        words += [
            f"{key}={_format_value(value)}"
            for key, value in self.params.items()
            if key != positional and key not in self.defaulted
        ]
        return " ".join(words)

    @property
    def slug(self) -> str:
        """A short file-name-safe label: ``int8``, ``prune0.8``, ``pq-dsub2-retrain``: a
        bare mode alone, another bare value after the technique."""
        positional = self.positional_param
        if positional == "mode":
            words = [str(self.mode)]
        elif positional:
            words = [f"{self.technique}{_format_value(self.params[positional])}"]
        else:
            words = [self.technique]
        for key, value in self.params.items():
            if key == positional or key in self.defaulted:
                continue
            if value is True or str(value).lower() == "true":
                words.append(key)
            elif value is False or str(value).lower() == "false":
                words.append(f"no{key}")
            else:
                words.append(f"{key}{_format_value(value)}")
        return re.sub(r"[^A-Za-z0-9._-]", "", "-".join(words))


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass(frozen=True)
class TensorSpec:
    """A model input: ``TensorSpec("x", (None, 64), "float32")``; None is a dynamic axis.

    ``optional`` inputs have a default in the model's framework (a transformer's
    ``token_type_ids`` are zeros): data may leave them out. Examples run along
    ``batch_axis`` (None: the input is the same for every example); core sets it
    from ``--set batch_axis.NAME=K``."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    optional: bool = False
    batch_axis: int | None = 0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "optional": self.optional, "batch_axis": self.batch_axis}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(data["name"], tuple(data["shape"]), data["dtype"], bool(data.get("optional")),
                   data.get("batch_axis", 0))


@dataclass
class Model:
    """A loaded model. ``handle`` is the backend's own object (a torch module, a
    Keras model, a fastText model...); core never looks inside it."""

    backend: str
    source: Path
    format: str
    handle: Any
    inputs: tuple[TensorSpec, ...] = ()
    #: Things the report should say, e.g. "pruned one-shot: no training data".
    notes: list[str] = field(default_factory=list)
    #: Facts to report, e.g. {"float_nodes": [...], "opset": 17}.
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Bytes the model takes on disk with its side files (ONNX external data), when
    #: more than the path itself; core sizes the run's disk needs from it.
    source_bytes: int | None = None


@dataclass
class Dataset:
    """A data file read for a model: features, and labels when the file has them."""

    path: Path
    features: Any
    labels: Any | None
    size: int
    #: What the report should say about the data, e.g. an optional input left out.
    notes: list[str] = field(default_factory=list)
    #: An ``.npz`` of these features and labels that the plugin wrote into the run's
    #: workdir (text tokenized once): the measuring process reads it instead of ``path``.
    prepared: Path | None = None


@dataclass(frozen=True)
class Artifact:
    """A saved, deployable model file (plus any side files such as ONNX external data).

    ``metadata`` and ``notes`` are what saving found out, for the report: they join the
    saved model's own (``Model.metadata``/``Model.notes``), saving's winning where both
    name a fact. They stay in the run that made the artifact (``to_json`` leaves them out)."""

    backend: str
    path: Path
    format: str
    side_files: tuple[Path, ...] = ()
    #: Facts of the saved file, e.g. ``{"opset": 17, "float_nodes": [...]}``.
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)
    #: Things the report should say about the saved file.
    notes: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.path, *self.side_files)

    def plain_files(self) -> list[Path]:
        """Every file of the artifact that exists: a folder's files inside it, in order (not
        the symlinks in it)."""
        return [file for path in self.files
                for file in (sorted(item for item in path.rglob("*") if item.is_file() and not item.is_symlink())
                             if path.is_dir() else [path])
                if file.is_file()]

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "path": str(self.path),
            "format": self.format,
            "side_files": [str(p) for p in self.side_files],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Artifact:
        return cls(
            data["backend"],
            Path(data["path"]),
            data["format"],
            tuple(Path(p) for p in data.get("side_files", ())),
        )


ProgressCallback = Callable[[str, float | None], None]


def _no_progress(message: str, fraction: float | None) -> None:
    return None


@dataclass
class Context:
    """Everything a load, compress or save call may need besides the model."""

    #: Validated backend options from ``--set`` (load/measure options).
    options: dict[str, Any] = field(default_factory=dict)
    train_data: Dataset | None = None
    calibration_data: Dataset | None = None
    eval_data: Dataset | None = None
    #: The user passed ``--trust``: formats that execute code may be loaded.
    trust: bool = False
    #: A scratch folder that core deletes afterwards.
    workdir: Path | None = None
    #: ``progress("calibrating", 0.4)``; silent unless output is a terminal.
    progress: ProgressCallback = _no_progress
    seed: int = 0


#: The environment variable that sets the default of ``--min-seconds`` (and of the Python API's
#: ``min_seconds``): a CI pipeline that checks figures rather than timing them sets 0.
MIN_SECONDS_VARIABLE = "COMPRESSOR_MIN_SECONDS"
DEFAULT_MIN_SECONDS = 0.5


def default_min_seconds() -> float:
    """``COMPRESSOR_MIN_SECONDS`` where it is set, else 0.5; a value that is not a number from 0
    to 3600 is a usage error (one line)."""
    import math
    import os

    text = os.environ.get(MIN_SECONDS_VARIABLE, "").strip()
    if not text:
        return DEFAULT_MIN_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 3600:
        from compressor.errors import UsageError

        raise UsageError(f"{MIN_SECONDS_VARIABLE}={text!r} is not a number of seconds from 0 to 3600")
    return value


@dataclass(frozen=True)
class MeasureSettings:
    """How runtime measurements are taken; recorded in every report."""

    threads: int = 1
    warmup: int = 5
    min_iterations: int = 30
    min_seconds: float = field(default_factory=default_min_seconds)
    batch_size: int = 32
    max_examples: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    #: A variant's latency is timed against the original's until the 95% interval of their
    #: ratio is within this relative half-width (0.03: +-3%); 0: for ``min_seconds`` only.
    precision: float = 0.03
    #: The most seconds that side-by-side timing takes per variant.
    max_seconds: float = 60.0
    #: A repeat (``--repeats``): only the timings; load time, memory, fidelity and the sizes
    #: are measured once, by an artifact's first measurement.
    timing_only: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "warmup": self.warmup,
            "min_iterations": self.min_iterations,
            "min_seconds": self.min_seconds,
            "batch_size": self.batch_size,
            "max_examples": self.max_examples,
            "options": dict(self.options),
            "precision": self.precision,
            "max_seconds": self.max_seconds,
            **({"timing_only": True} if self.timing_only else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MeasureSettings:
        return cls(**{**data, "options": dict(data.get("options", {}))})


@dataclass
class Measurement:
    """Deprecated, with the ``compressor_measure`` hook that returned it (core no longer
    calls it): a backend returns a :class:`~compressor.runtime.Runtime` from
    ``compressor_open_runtime`` and core measures that. ``predictions`` are top-1 predictions, one per evaluation example
    (ints or strings); ``outputs`` are raw float outputs, one row per example."""

    metrics: dict[str, Any] = field(default_factory=dict)
    predictions: Sequence[Any] | None = None
    outputs: Any | None = None


@dataclass(frozen=True)
class SampleModel:
    """A small model a backend makes for ``compressor demo``."""

    backend: str
    name: str
    path: Path
    variants: tuple[tuple[str, ...], ...]
    eval_data: Path | None = None
    calibration_data: Path | None = None
    train_data: Path | None = None
    options: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
