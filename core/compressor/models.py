"""The objects that travel through the hooks: models, data, steps, artifacts, measurements."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.specs import POSITIONAL_PARAM, QUANTIZE


@dataclass(frozen=True)
class Step:
    """One compression step, e.g. ``Step("prune", {"sparsity": 0.8, "epochs": 2})``.

    Once validated, ``params`` holds every parameter the backend declares a
    default for; ``defaulted`` names those the user did not give (left out of
    the step's text and file name)."""

    technique: str
    params: Mapping[str, Any] = field(default_factory=dict)
    defaulted: frozenset[str] = frozenset()

    @property
    def mode(self) -> str | None:
        return self.params.get("mode")

    def __str__(self) -> str:
        positional = POSITIONAL_PARAM.get(self.technique)
        words = [self.technique]
        if positional and positional in self.params:
            words.append(_format_value(self.params[positional]))
        words += [
            f"{key}={_format_value(value)}"
            for key, value in self.params.items()
            if key != positional and key not in self.defaulted
        ]
        return " ".join(words)

    @property
    def slug(self) -> str:
        """A short file-name-safe label: ``int8``, ``prune0.8``, ``pq-dsub2-retrain``."""
        positional = POSITIONAL_PARAM.get(self.technique)
        if self.technique == QUANTIZE and self.mode:
            words = [str(self.mode)]
        elif positional and positional in self.params:
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


@dataclass(frozen=True)
class MeasureSettings:
    """How runtime measurements are taken; recorded in every report."""

    threads: int = 1
    warmup: int = 5
    min_iterations: int = 30
    min_seconds: float = 0.5
    batch_size: int = 32
    max_examples: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "warmup": self.warmup,
            "min_iterations": self.min_iterations,
            "min_seconds": self.min_seconds,
            "batch_size": self.batch_size,
            "max_examples": self.max_examples,
            "options": dict(self.options),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MeasureSettings:
        return cls(**{**data, "options": dict(data.get("options", {}))})


@dataclass
class Measurement:
    """What a measurer found. ``predictions`` are top-1 predictions, one per
    evaluation example (ints or strings); ``outputs`` are raw float outputs,
    one row per example, for cosine similarity when top-1 makes no sense."""

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
