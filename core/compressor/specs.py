"""What a backend declares about itself: its techniques, their parameters, its options.

A plugin returns :class:`Backend` objects from ``compressor_backends``; core uses
them to validate every request *before* any work starts, to coerce ``--set``
strings, and to list what is supported when a request is not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from compressor.errors import UsageError
from compressor.vocabulary import (
    DEFAULT_ORDER,
    PQ,
    PRUNE,
    QUANTIZE,
    QUANTIZE_MODES,
    CliFlag,
    SizeFactor,
    shared_declaration,
)

__all__ = ["DEFAULT_ORDER", "PQ", "PRUNE", "QUANTIZE", "QUANTIZE_MODES", "CliFlag", "SizeFactor"]


#: What an output is, for comparing it (``compressor.tasks``).
TASKS = ("classifier", "probability", "multi-label", "embedding", "language-model", "ctc", "sequence", "map",
         "detection", "regression", "state")
#: ``--set task=``: an output's task for every output, or ``generate``: the model measured generating
#: (:mod:`compressor.generation`), its outputs' tasks inferred.
MODEL_TASKS = (*TASKS, "generate")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Param:
    """One settable parameter of a technique or backend option.

    >>> Param(float, 0.5, "target sparsity", minimum=0, maximum=1).coerce("sparsity", "0.8")
    0.8
    """

    type: type
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    required: bool = False
    #: Values worth trying in ``compressor search``, mildest first; a value may be a
    #: mapping of several parameters set together (``{"cutoff": 100000, "retrain": True}``).
    candidates: tuple[Any, ...] = ()

    def coerce(self, key: str, value: Any) -> Any:
        """Convert ``value`` (often a string from the CLI or TOML) and range-check it."""
        try:
            converted = self._convert(value)
        except (TypeError, ValueError, OverflowError):
            kind = "finite number" if self.type is float else self.type.__name__
            raise UsageError(f"{key}={value!r} is not a valid {kind}") from None
        if self.choices is not None and converted not in self.choices:
            raise UsageError(f"{key}={value!r} is not one of: {', '.join(self.choices)}")
        if self.minimum is not None and converted < self.minimum:
            raise UsageError(f"{key}={value!r} is below the minimum {self.minimum}")
        if self.maximum is not None and converted > self.maximum:
            raise UsageError(f"{key}={value!r} is above the maximum {self.maximum}")
        return converted

    def _convert(self, value: Any) -> Any:
        if self.type is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError(value)
        if self.type is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if self.type in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        converted = self.type(value)
        if self.type is float and not math.isfinite(converted):
            raise ValueError(value)
        return converted


#: Options every backend takes: how core feeds the data and compares the outputs
#: (docs/measuring.md). Families keyed by an input or output name follow.
MEASURE_OPTIONS: dict[str, Param] = {}
MEASURE_OPTION_FAMILIES = {"task.": "the task of one output", "batch_axis.": "an input's batch axis or none",
                           "state.": "feed this output back as the named input"}


#: The ``Technique.requires_data`` key of data that every step of the technique needs.
EVERY_STEP = "*"
@dataclass(frozen=True)
class Technique:
    """A technique a backend supports, e.g. ``quantize`` with its modes.

    ``requires_data`` names the data a step needs, keyed by a mode, by a
    boolean parameter, or by :data:`EVERY_STEP` for a technique that always needs
    it: ``{"int8": "calibration", "retrain": "train"}``, ``{EVERY_STEP: "train"}``.
    Core refuses a step whose data is missing before any work starts.

    What core knows of a technique it learns here, never from its name: the parameter a
    bare value sets (``positional``), its ``compressor run`` option (``cli``), how much of
    the input a step leaves (``size_factor``, for the disk-space check) and where its
    steps go among others (``order``, and ``candidates`` for ``compressor search``).
    """

    name: str
    help: str = ""
    modes: tuple[str, ...] = ()
    params: Mapping[str, Param] = field(default_factory=dict)
    requires_data: Mapping[str, str] = field(default_factory=dict)
    #: Steps worth trying in ``compressor search``, from the mildest to the most
    #: aggressive (``("prune 0.3", "prune 0.5", "prune 0.7")``); empty: not searched.
    candidates: tuple[str, ...] = ()
    #: The parameter a bare value in a step sets: ``prune 0.8`` -> sparsity=0.8. A
    #: technique with ``modes`` takes its mode so unless it names another (``quantize int8``).
    positional: str | None = None
    #: The ``compressor run`` option that adds a step of this technique (``--prune S``).
    cli: CliFlag | None = None
    #: The share of the input's bytes a step leaves, for the disk-space check made before a
    #: run: ``0.5``; per mode ``{"fp16": 0.5, "int8": 0.3}``; or ``function(params) -> share``.
    #: None: not declared (another backend's declaration of the technique is used, else 1.0).
    size_factor: SizeFactor | None = None
    #: Where this technique's steps go when search or the command-line options put steps
    #: together: lower first. The built-in techniques: distill 10, prune 20, lowrank 30,
    #: pq 40, quantize 60; :data:`DEFAULT_ORDER` (50) puts one after those, before quantizing.
    order: int | None = None

    def __post_init__(self) -> None:
        # A technique of the shared vocabulary takes what that vocabulary declares unless it
        # declares otherwise (a plugin written before these fields gets -q, --prune, --pq).
        for key, value in shared_declaration(self.name, self.params, bool(self.modes)).items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.order is None:
            object.__setattr__(self, "order", DEFAULT_ORDER)
        if self.positional is None and self.modes:
            object.__setattr__(self, "positional", "mode")
        known = (["mode"] if self.modes else []) + list(self.params)
        if self.positional is not None and self.positional not in known:
            raise ValueError(f"technique {self.name!r}: positional {self.positional!r} is none of its "
                             f"parameters ({', '.join(known) or 'none'})")
        if self.cli is not None and self.cli.takes_value and self.positional is None:
            raise ValueError(f"technique {self.name!r}: {self.cli.name} takes a value, which needs a positional "
                             "parameter to set")

    def size_after(self, params: Mapping[str, Any]) -> float | None:
        """The share of the input's bytes a step with ``params`` leaves; None: not declared."""
        factor = self.size_factor
        if factor is None:
            return None
        if callable(factor):
            return float(factor(params))
        if isinstance(factor, Mapping):
            return float(factor.get(str(params.get("mode")), 1.0))
        return float(factor)


@dataclass(frozen=True)
class Backend:
    """A backend: the formats it reads and the techniques it applies.

    Example, as a plugin would declare it::

        Backend(
            name="npz",
            description="NumPy weight archives",
            formats=(".npz",),
            extra="",
            requires=("numpy",),
            techniques={"quantize": Technique("quantize", modes=("fp16", "int8"))},
        )
    """

    name: str
    description: str
    formats: tuple[str, ...]
    techniques: Mapping[str, Technique]
    #: Options for loading and measuring (``--set model_factory=...``).
    options: Mapping[str, Param] = field(default_factory=dict)
    #: The ``pip install compressor[EXTRA]`` that brings the dependencies.
    extra: str = ""
    #: Importable modules that must be present; checked without importing them.
    requires: tuple[str, ...] = ()
    #: Distributions whose versions go into reports.
    distributions: tuple[str, ...] = ()
    #: Variants ``compressor run`` makes when no technique is asked for.
    default_variants: tuple[tuple[str, ...], ...] = ()
    #: ``{module: (distribution, ...)}``: the distributions that may provide a required
    #: module. Another one providing it (``fasttext-predict`` installs a different
    #: ``fasttext``) makes the backend "installed but broken", told without importing.
    providers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: Modules the measuring process imports before it times opening the runtime,
    #: so ``load_ms`` is the artifact's load, not the framework's import.
    runtime_imports: tuple[str, ...] = ()
    #: Filled in by core: the plugin that registered this backend.
    plugin_name: str = ""

    def technique(self, name: str) -> Technique:
        try:
            return self.techniques[name]
        except KeyError:
            from compressor.errors import UnsupportedError

            raise UnsupportedError(
                f"backend {self.name!r} does not support technique {name!r}; "
                f"it supports: {', '.join(self.techniques) or 'none'}"
            ) from None

    def is_installed(self) -> bool:
        return not self.missing_modules()

    def broken_reason(self, deep: bool = False) -> str | None:
        """Why an installed backend cannot work: a module from the wrong distribution
        (checked from package metadata, nothing imported) or, with ``deep``, a module
        that fails to import."""
        import importlib

        for module, allowed in self.providers.items():
            found = _providing_distribution(module)
            if found is not None and found not in allowed:
                # An allowed distribution still installed had its files overwritten: reinstall it.
                overwritten = next((name for name in allowed if _installed(name)), None)
                fix = (f"pip uninstall -y {found} && pip install --force-reinstall --no-deps {overwritten}"
                       if overwritten else f"pip uninstall {found}; {self.install_hint()}")
                return f"the module {module!r} comes from {found}, not {' or '.join(allowed)} ({fix})"
        if deep:
            for module in (*self.requires, *self.runtime_imports):
                try:
                    importlib.import_module(module)
                except Exception as error:  # noqa: BLE001 - any failure to import is the reason
                    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                    return f"importing {module!r} fails ({type(error).__name__}: {first[:160]})"
        return None

    def missing_modules(self) -> list[str]:
        from importlib.util import find_spec

        missing = []
        for module in self.requires:
            try:
                if find_spec(module) is None:
                    missing.append(module)
            except (ImportError, ValueError):
                missing.append(module)
        return missing

    def install_hint(self) -> str:
        return f"pip install 'compressor[{self.extra}]'" if self.extra else "see the plugin's docs"


MEASURE_OPTIONS.update({
    "outputs": Param(str, None, "comma-separated outputs to compare (default: all)"),
    "task": Param(str, None, "what every output is, or generate: a causal LM measured generating",
                  choices=MODEL_TASKS),
    "eval_batch": Param(int, 1, "batch size for computing fidelity", minimum=1, maximum=4096),
    "batch_seconds": Param(float, None, "time budget of the batch timing (default 30 s)", minimum=0, maximum=3600),
    "label_output": Param(str, None, "the output the labels belong to (default: the first classifier)"),
    "ctc_blank": Param(int, None, "the blank class of CTC outputs (default: inferred, else 0)", minimum=0),
    "score_threshold": Param(float, None, "detections: the least score kept (default 0.25)", minimum=0),
    "objectness": Param(bool, None, "anchor heads: whether an objectness score precedes the classes"),
})


def _providing_distribution(module: str) -> str | None:
    """The installed distribution whose files hold what ``import module`` would load
    (found from metadata, without importing it); None when unknown."""
    from importlib import metadata
    from importlib.util import find_spec
    from pathlib import Path

    try:
        spec = find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    origin = Path(spec.origin).resolve()
    # How a RECORD names the file: ``fasttext/__init__.py`` for a package, ``six.py`` for a module.
    tail = origin.name if spec.submodule_search_locations is None else f"{origin.parent.name}/{origin.name}"
    overwritten = None
    for distribution in metadata.distributions():
        if tail not in (distribution.read_text("RECORD") or ""):
            continue  # cheap: most distributions never name the file
        entry = next((file for file in distribution.files or []
                      if Path(distribution.locate_file(file)).resolve() == origin), None)
        if entry is None:
            continue
        name = distribution.metadata["Name"]
        if entry.hash is None or _recorded(origin, entry.hash):
            return str(name)
        # Two distributions install this file (fasttext-numpy2 and fasttext-predict both write
        # fasttext/__init__.py): the one whose recorded hash matches wrote it last.
        overwritten = overwritten or str(name)
    return overwritten


def _recorded(path: Any, recorded: Any) -> bool:
    """Whether ``path`` holds what a RECORD hash (``sha256``, urlsafe base64) says; True
    when the hash cannot be checked."""
    import base64
    import hashlib

    try:
        digest = hashlib.new(recorded.mode, path.read_bytes()).digest()
    except (ValueError, OSError):
        return True
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == recorded.value


def _installed(distribution: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True
