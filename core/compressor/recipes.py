"""Recipes: named variants, each an ordered list of steps, plus sweeps.

A recipe is a TOML file that runs unchanged on every backend that supports
its steps::

    description = "pruning study"

    [variants.fp16]
    steps = ["quantize fp16"]

    [variants.sparse]
    steps = ["prune {sparsity} epochs=2", "quantize int8"]
    sweep = { sparsity = [0.1, 0.5, 0.8] }   # -> sparse-0.1, sparse-0.5, sparse-0.8

A step is a string (``technique [value] [key=value ...]``) or a table
(``{ technique = "pq", dsub = 2 }``).
"""

from __future__ import annotations

import itertools
import math
import re
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.errors import UsageError
from compressor.models import Step
from compressor.specs import POSITIONAL_PARAM

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ORIGINAL = "original"
#: ``compressor run`` refuses recipes that expand to more variants (``--max-variants``).
MAX_VARIANTS = 1000
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_RECIPE_KEYS = {"description", "variants"}
_VARIANT_KEYS = {"steps", "sweep"}


@dataclass(frozen=True)
class Variant:
    """A named, ordered list of steps applied to a fresh copy of the model."""

    name: str
    steps: tuple[Step, ...]


def parse_step(text: str) -> Step:
    """``"prune 0.8 epochs=2"`` -> ``Step("prune", {"sparsity": "0.8", "epochs": "2"})``.

    Values stay strings here; the backend's declared parameters coerce them.
    """
    try:
        words = shlex.split(text)
    except ValueError as error:
        raise UsageError(f"cannot parse step {text!r}: {error}") from None
    if not words:
        raise UsageError("empty step")
    technique, params = words[0].lower(), {}
    for word in words[1:]:
        if "=" in word:
            key, _, value = word.partition("=")
            if not key:
                raise UsageError(f"step {text!r}: missing name before '=' in {word!r}")
            params[key] = value
        elif technique in POSITIONAL_PARAM and POSITIONAL_PARAM[technique] not in params:
            params[POSITIONAL_PARAM[technique]] = word
        else:
            raise UsageError(
                f"step {text!r}: unexpected value {word!r}; write parameters as key=value"
            )
    return Step(technique, params)


def step_from_table(table: Mapping[str, Any]) -> Step:
    params = dict(table)
    technique = params.pop("technique", None)
    if not isinstance(technique, str):
        raise UsageError(f"step table {dict(table)!r} needs a 'technique' string")
    return Step(technique.lower(), params)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UsageError(
            f"variant name {name!r} must be letters, digits, '.', '_' or '-' (at most 80)"
        )
    if name == ORIGINAL:
        raise UsageError(f"variant name {ORIGINAL!r} is reserved for the unmodified model")
    return name


def variant_name(steps: Sequence[Step]) -> str:
    return "-".join(step.slug for step in steps) or "copy"


def variants_from_strings(rows: Iterable[Sequence[str]]) -> list[Variant]:
    """Variants from lists of step strings, named after their steps."""
    return unique([Variant(variant_name(s := [parse_step(t) for t in row]), tuple(s)) for row in rows])


def file_stem(name: str) -> str:
    """The file name a variant's artifact gets (dots would read as a suffix)."""
    return name.replace(".", "_")


def unique(variants: Sequence[Variant]) -> list[Variant]:
    """Refuse two variants with one name, or whose artifacts would share a file name."""
    seen: dict[str, str] = {ORIGINAL: ORIGINAL}
    for variant in variants:
        stem = file_stem(variant.name)
        if stem in seen:
            if seen[stem] == variant.name:
                raise UsageError(f"two variants are named {variant.name!r}")
            raise UsageError(
                f"variants {seen[stem]!r} and {variant.name!r} would both be saved as {stem}.*; rename one"
            )
        seen[stem] = variant.name
    return list(variants)


def variants_from_flags(
    quantize: Sequence[str], prune: float | None, pq: bool
) -> list[Variant]:
    """CLI flags: ``--prune S`` and ``--pq`` run before each ``--quantize MODE``
    (one variant per mode); with no mode, one variant of the others."""
    leading = []
    if prune is not None:
        leading.append(Step("prune", {"sparsity": prune}))
    if pq:
        leading.append(Step("pq", {}))
    if not quantize:
        return [Variant(variant_name(leading), tuple(leading))] if leading else []
    variants = []
    for mode in quantize:
        steps = (*leading, Step("quantize", {"mode": mode}))
        variants.append(Variant(variant_name(steps), steps))
    return unique(variants)


def load_recipe(path: Path, max_variants: int = MAX_VARIANTS) -> list[Variant]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError("recipe file not found", path) from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read recipe ({error})", path) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"invalid TOML: {_with_position(str(error), text)}", path) from None
    except RecursionError:
        raise UsageError("invalid TOML: nested too deeply", path) from None
    try:
        return parse_recipe(document, max_variants)
    except UsageError as error:
        raise UsageError(error.message, path) from None


def _with_position(message: str, text: str) -> str:
    """tomllib says "at end of document" for unclosed things: give the line and column."""
    if "(at end of document)" not in message:
        return message
    lines = text.splitlines() or [""]
    return message.replace(
        "(at end of document)",
        f"(at end of document: line {len(lines)}, column {len(lines[-1]) + 1})",
    )


def parse_recipe(document: Mapping[str, Any], max_variants: int = MAX_VARIANTS) -> list[Variant]:
    unknown = set(document) - _RECIPE_KEYS
    if unknown:
        raise UsageError(
            f"unknown recipe key(s) {', '.join(sorted(unknown))}; expected: "
            f"{', '.join(sorted(_RECIPE_KEYS))}"
        )
    tables = document.get("variants")
    if not isinstance(tables, Mapping) or not tables:
        raise UsageError("a recipe needs at least one [variants.NAME] table with steps")
    count = sum(_count(check_name(name), table) for name, table in tables.items())
    if count > max_variants:
        raise UsageError(
            f"the recipe makes {count:,} variants, more than the limit of {max_variants:,}; "
            "shorten its sweeps or raise the limit with --max-variants"
        )
    variants: list[Variant] = []
    for name, table in tables.items():
        variants.extend(_expand(name, table))
    return unique(variants)


def _count(name: str, table: Any) -> int:
    """How many variants a table expands to, without expanding it."""
    sweep = table.get("sweep", {}) if isinstance(table, Mapping) else {}
    if not isinstance(sweep, Mapping):
        return 1
    return math.prod(len(values) if isinstance(values, list) else 1 for values in sweep.values())


def _expand(name: str, table: Any) -> list[Variant]:
    if not isinstance(table, Mapping):
        raise UsageError(f"variants.{name} must be a table with 'steps'")
    unknown = set(table) - _VARIANT_KEYS
    if unknown:
        raise UsageError(f"variants.{name}: unknown key(s) {', '.join(sorted(unknown))}")
    raw_steps = table.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise UsageError(f"variants.{name}.steps must be a non-empty list of steps")
    sweep = table.get("sweep", {})
    if not isinstance(sweep, Mapping):
        raise UsageError(f"variants.{name}.sweep must be a table of lists")
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise UsageError(f"variants.{name}.sweep.{key} must be a non-empty list")
        if not any(f"{{{key}}}" in str(step) for step in raw_steps):
            raise UsageError(f"variants.{name}.sweep.{key} is not used as {{{key}}} in any step")
    keys = list(sweep)
    variants = []
    for combination in itertools.product(*(sweep[key] for key in keys)):
        values = dict(zip(keys, combination))
        steps = tuple(_substitute(name, step, values) for step in raw_steps)
        suffix = "-".join(_format(value) for value in combination)
        variants.append(Variant(check_name(f"{name}-{suffix}" if suffix else name), steps))
    return variants


def _format(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _substitute(name: str, raw: Any, values: Mapping[str, Any]) -> Step:
    def fill(text: str) -> str:
        def replace(match: re.Match[str]) -> str:
            if match.group(1) not in values:
                raise UsageError(f"variants.{name}: {{{match.group(1)}}} has no sweep values")
            return _format(values[match.group(1)])

        return _PLACEHOLDER.sub(replace, text)

    if isinstance(raw, str):
        return parse_step(fill(raw))
    if isinstance(raw, Mapping):
        return step_from_table(
            {k: fill(v) if isinstance(v, str) else v for k, v in raw.items()}
        )
    raise UsageError(f"variants.{name}: a step must be a string or a table, not {raw!r}")
