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
(``{ technique = "pq", dsub = 2 }``). ``{{`` and ``}}`` in a step are literal braces.

A variant's name is one file-name component: its artifact is saved as
:func:`file_stem` plus the backend's suffix, inside ``--out`` and nowhere else.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import numbers
import re
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.errors import UsageError
from compressor.models import Step
from compressor.specs import Technique

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ORIGINAL = "original"
#: ``compressor run`` refuses recipes that expand to more variants (``--max-variants``).
MAX_VARIANTS = 1000
#: Longest variant name: its file name (plus a suffix) stays far below every filesystem's limit.
MAX_NAME = 80
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME - 1}}}")
#: File stems compressor writes itself (``report.json``, ``best.onnx``, ``recipe.toml``) and
#: device names Windows reserves whatever the suffix: no variant is saved under one of these.
RESERVED_STEMS = frozenset({ORIGINAL, "best", "report", "recipe", "con", "prn", "aux", "nul",
                            *(f"com{n}" for n in range(1, 10)), *(f"lpt{n}" for n in range(1, 10))})
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
_RECIPE_KEYS = {"description", "variants"}
_VARIANT_KEYS = {"steps", "sweep"}


@dataclass(frozen=True)
class Variant:
    """A named, ordered list of steps applied to a fresh copy of the model."""

    name: str
    steps: tuple[Step, ...]


def parse_step(text: str, techniques: Mapping[str, Technique] | None = None) -> Step:
    """``"prune 0.8 epochs=2"`` -> ``Step("prune", {"sparsity": "0.8", "epochs": "2"})``.

    A bare value sets the parameter the technique declares ``positional``: in
    ``techniques`` (a backend's, when the step is its own), else in the installed
    backends (:func:`compressor.declarations.positional_param`). Values stay strings
    here; the backend's declared parameters coerce them.
    """
    try:
        words = shlex.split(text)
    except ValueError as error:
        raise UsageError(f"cannot parse step {text!r}: {error}") from None
    if not words:
        raise UsageError("empty step")
    technique, params = words[0].lower(), {}
    positional = _positional(technique, techniques)
    for word in words[1:]:
        if "=" in word:
            key, _, value = word.partition("=")
            if not key:
                raise UsageError(f"step {text!r}: missing name before '=' in {word!r}")
            params[key] = value
        elif positional is not None and positional not in params:
            params[positional] = word
        else:
            raise UsageError(
                f"step {text!r}: unexpected value {word!r}; write parameters as key=value"
            )
    return Step(technique, params, positional=positional)


def _positional(technique: str, techniques: Mapping[str, Technique] | None) -> str | None:
    own = techniques.get(technique) if techniques is not None else None
    if own is not None and own.positional is not None:
        return own.positional
    from compressor.declarations import positional_param

    return positional_param(technique)


def step_from_table(table: Mapping[str, Any]) -> Step:
    params = dict(table)
    technique = params.pop("technique", None)
    if not isinstance(technique, str):
        raise UsageError(f"step table {dict(table)!r} needs a 'technique' string")
    return Step(technique.lower(), params)


def check_name(name: object) -> str:
    """``name`` if it can name a variant: one safe file-name component (letters, digits,
    '.', '_', '-', starting with a letter or digit, at most :data:`MAX_NAME` characters:
    never a path, ``..`` or an absolute name) and no name compressor keeps for itself."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 60 else repr(name[:57] + "...")
        raise UsageError(
            f"variant name {shown} must be one file name of letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit, at most {MAX_NAME} characters"
        )
    if name == ORIGINAL:
        raise UsageError(f"variant name {ORIGINAL!r} is reserved for the unmodified model")
    if file_stem(name).lower() in RESERVED_STEMS:
        raise UsageError(f"variant name {name!r} is reserved: compressor writes {file_stem(name)}.* "
                         "itself, or the name is a device name on Windows; choose another")
    return name


def is_valid_name(name: object) -> bool:
    """One safe file-name component of at most :data:`MAX_NAME` characters (``original`` included)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def variant_name(steps: Sequence[Step]) -> str:
    """A name made from the steps (``prune0.5-int8``), always a valid variant name: a name
    too long or otherwise unusable keeps its start and gets a short hash of the whole, so
    different steps keep different names."""
    wanted = "-".join(step.slug for step in steps) or "copy"
    trimmed = wanted.lstrip("._-") or "copy"
    if _NAME.fullmatch(trimmed) and file_stem(trimmed).lower() not in RESERVED_STEMS:
        return trimmed
    digest = hashlib.sha256(wanted.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{trimmed[:MAX_NAME - 9]}-{digest}"


def variants_from_strings(rows: Iterable[Sequence[str]]) -> list[Variant]:
    """Variants from lists of step strings, named after their steps."""
    return unique([Variant(variant_name(s := [parse_step(t) for t in row]), tuple(s)) for row in rows])


def file_stem(name: str) -> str:
    """The file name a variant's artifact gets before the backend's suffix: dots become
    underscores (``prune0.5`` -> ``prune0_5.onnx``), because backends add their suffix with
    ``Path.with_suffix``, which would otherwise cut the name at its last dot. The report's
    ``artifact`` field names each variant's file."""
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


def variants_from_flags(given: Sequence[tuple[Technique, Sequence[Any]]]) -> list[Variant]:
    """The variants of ``compressor run``'s technique options: each ``(technique, values)``
    given adds a step of the technique to every variant, its value setting the technique's
    positional parameter (None: a switch, the step without parameters); a repeated option
    (``CliFlag.repeat``) makes one variant per value. Steps run in their techniques' order:
    ``--prune 0.5 -q fp16 -q int8`` makes prune0.5-fp16 and prune0.5-int8."""
    choices = []
    for technique, values in sorted(given, key=lambda entry: entry[0].order):
        steps = [Step(technique.name, {} if value is None or technique.positional is None
                      else {technique.positional: value}, positional=technique.positional) for value in values]
        if steps:
            choices.append(steps)
    if not choices:
        return []
    return unique([Variant(variant_name(steps), tuple(steps)) for steps in itertools.product(*choices)])


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
            if match.group(1) is None:  # {{ or }}: a literal brace
                return match.group(0)[0]
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


# ------------------------------------------------------------------ writing recipes


def recipe_text(variants: Sequence[Variant], comment: str = "") -> str:
    """A recipe that :func:`load_recipe` reads back as exactly ``variants`` (same names, same
    steps, same parameter values and types). A step is written as its string when that string
    parses back to the same step, else as a table; every string is TOML-quoted."""
    lines = [f"# {_comment_safe(line)}".rstrip() for line in comment.splitlines()]
    for variant in variants:
        steps = ", ".join(_step_toml(step) for step in variant.steps)
        lines += ["", f"[variants.{_toml_key(check_name(variant.name))}]", f"steps = [{steps}]"]
    return "\n".join(lines).lstrip("\n") + "\n"


def _step_toml(step: Step) -> str:
    text = str(step)
    try:
        same = parse_step(text) == Step(step.technique, dict(step.params))
    except UsageError:
        same = False
    if same:
        return toml_value(_literal_braces(text))
    if "technique" in step.params:
        raise UsageError(f"step '{step}' has a parameter named 'technique' and cannot be written to a recipe")
    table = {"technique": step.technique, **step.params}
    return toml_value({key: _literal_braces(value) if isinstance(value, str) else value
                       for key, value in table.items()})


def _literal_braces(text: str) -> str:
    """Braces doubled, so that loading the recipe does not read ``{name}`` as a sweep value."""
    return text.replace("{", "{{").replace("}", "}}")


def toml_value(value: Any) -> str:
    """``value`` as TOML (strings, booleans, integers, floats, lists and tables of them)."""
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isnan(number):
            return "nan"
        return repr(number) if math.isfinite(number) else ("inf" if number > 0 else "-inf")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(str(key))} = {toml_value(item)}" for key, item in value.items()) + " }"
    raise UsageError(f"cannot write {type(value).__name__} value {value!r} to a TOML recipe")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    escaped = []
    for character in text:
        code = ord(character)
        if character in _TOML_ESCAPES:
            escaped.append(_TOML_ESCAPES[character])
        elif code < 0x20 or code == 0x7F:
            escaped.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:
            raise UsageError(f"{text!r} holds a lone surrogate, which TOML cannot hold")
        else:
            escaped.append(character)
    return '"' + "".join(escaped) + '"'


def _comment_safe(line: str) -> str:
    return "".join(c if c == "\t" or (ord(c) >= 0x20 and ord(c) != 0x7F and not 0xD800 <= ord(c) <= 0xDFFF)
                   else "?" for c in line)
