"""What ``compressor search`` may try: stages of steps, each from the mildest to the
most aggressive, applied in order (a smaller architecture, then pruning, then
quantization, as practitioners stack them).

A backend declares the steps worth trying with ``Technique.candidates`` (or a
parameter's ``Param.candidates``), and where its stage goes with ``Technique.order``;
a recipe can give the space instead (its stages in the recipe's order)::

    [search.stages]
    prune = ["none", "prune 0.3", "prune 0.5", "prune 0.7"]
    quantize = ["none", "quantize fp16", "quantize dynamic", "quantize int8"]

A configuration picks one option per stage. Options later in a stage are
stricter, so a configuration at least as strict as one that broke the budget
in every stage cannot meet it either: the search does not try it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from compressor.errors import UsageError
from compressor.models import Step
from compressor.recipes import Variant, parse_step, variant_name
from compressor.specs import DEFAULT_ORDER, Backend

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NONE = "none"

Config = tuple[int, ...]


@dataclass(frozen=True)
class Stage:
    name: str
    #: ``None`` (skip the stage) first, then steps from mildest to most aggressive.
    #: In a parameter's stage (``pq.dsub``) each step holds just that parameter,
    #: and None leaves it at its default; the stages of one technique make one step.
    options: tuple[Step | None, ...]
    technique: str = ""


def from_backend(backend: Backend) -> list[Stage]:
    """The space a backend declares: its techniques' ``candidates`` (whole steps) or,
    per parameter, its parameters' ``candidates`` (one stage each), in the order of the
    techniques' ``order`` (the stages of one technique as declared)."""
    stages = []
    for name, technique in backend.techniques.items():
        if technique.candidates:
            options = tuple(parse_step(text, backend.techniques) for text in technique.candidates)
            stages.append(Stage(name, (None, *options), name))
            continue
        for key, param in technique.params.items():
            if param.candidates:
                options = tuple(Step(name, dict(value) if isinstance(value, dict) else {key: value},
                                     positional=technique.positional)
                                for value in param.candidates)
                stages.append(Stage(f"{name}.{key}", (None, *options), name))
    if not stages:
        raise UsageError(f"backend {backend.name!r} declares nothing to search; give --space with a recipe")
    return sorted(stages, key=lambda stage: _stage_order(stage, backend))


def from_recipe(path: Path) -> list[Stage]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read the search space ({error})", path) from None
    except (tomllib.TOMLDecodeError, RecursionError) as error:
        raise UsageError(f"invalid TOML: {error}", path) from None
    table = document.get("search", {}).get("stages") if isinstance(document.get("search"), dict) else None
    if not isinstance(table, dict) or not table:
        raise UsageError("a search space needs a [search.stages] table of step lists", path)
    stages = []
    for name, options in table.items():
        if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
            raise UsageError(f"search.stages.{name} must be a list of step strings", path)
        try:
            steps = tuple(None if text.strip().lower() == NONE else parse_step(text) for text in options)
        except UsageError as error:
            raise UsageError(f"search.stages.{name}: {error.message}", path) from None
        stages.append(Stage(name, steps if steps[0] is None else (None, *steps), name))
    return stages


def _stage_order(stage: Stage, backend: Backend) -> int:
    technique = backend.techniques.get(stage.technique or stage.name)
    return technique.order if technique is not None else DEFAULT_ORDER


def size(stages: Sequence[Stage]) -> int:
    return math.prod(len(stage.options) for stage in stages)


def variant(config: Config, stages: Sequence[Stage]) -> Variant | None:
    """The variant a configuration makes (the parameter stages of one technique merged
    into one step); None when every stage is skipped (the original)."""
    steps: list[Step] = []
    merged: dict[str, int] = {}
    for stage, index in zip(stages, config):
        step = stage.options[index]
        if step is None:
            continue
        if stage.technique and stage.technique != stage.name and stage.technique in merged:
            position = merged[stage.technique]
            steps[position] = Step(step.technique, {**steps[position].params, **step.params},
                                   positional=steps[position].positional)
            continue
        merged[stage.technique or stage.name] = len(steps)
        steps.append(step)
    return Variant(variant_name(steps), tuple(steps)) if steps else None


def stricter(config: Config, than: Config) -> bool:
    """At least as aggressive as ``than`` in every stage, and not the same."""
    return config != than and all(a >= b for a, b in zip(config, than))


def configurations(stages: Sequence[Stage]) -> list[Config]:
    """Every configuration, mildest first (for exhaustion checks; small spaces only)."""
    import itertools

    return list(itertools.product(*(range(len(stage.options)) for stage in stages)))
