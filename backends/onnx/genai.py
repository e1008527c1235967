"""onnxruntime-genai's model builder as a technique of the onnx backend, ``export genai``,
so that compressor's own export of a Hugging Face causal LM and the builder's are made and
measured side by side in one run::

    compressor run llama/ --backend onnx --export compressor --export genai -q int4 -o out

makes ``compressor-int4`` (compressor's KV-cache export, quantized by compressor) and
``genai-int4`` (``onnxruntime_genai.models.builder`` at precision int4), both measured
generating (:mod:`compressor_onnx.genai_runtime`).

``export`` is the first step of a variant. ``export compressor`` is compressor's own export
(what a variant without the step gets) and changes nothing; ``export genai`` hands the
transformers folder to the builder at save time, fp32 alone or int4 when ``quantize int4``
follows (the only step that may). The int4 parameters the user set (``block_size``,
``symmetric``, ``accuracy_level``) become the builder's options; those left at compressor's
defaults leave the builder's own defaults in force (symmetric blocks of 32, accuracy level
4 on the CPU). ``builder_options`` passes any other builder option (``KEY=VALUE`` words).

The builder's output folder (``model.onnx``, its data, ``genai_config.json`` and the
tokenizer files) is the artifact (:mod:`compressor_onnx.genai_build`).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from compressor.plugin import (
    CliFlag,
    Context,
    Model,
    Param,
    Step,
    Technique,
    UnsupportedError,
    UsageError,
)

TECHNIQUE = "export"
#: The exporters of ``export``: compressor's own (the default) and the builder's.
COMPRESSOR, GENAI = "compressor", "genai"
#: ``Model.format`` and ``Artifact.format`` of a variant the builder makes.
GENAI_FORMAT = "genai"
PACKAGE = "onnxruntime-genai"
#: ``quantize int4`` parameters and the builder options they set (only where the user set them).
INT4_OPTIONS = {"block_size": "block_size", "accuracy_level": "accuracy_level", "symmetric": "is_symmetric"}
#: Models the builder's dispatch names that are no causal text decoder.
_NOT_TEXT_DECODERS = ("WhisperForConditionalGeneration",)
#: A tokenizer the builder can read (transformers' AutoTokenizer) is one of these files.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_ARCHITECTURE = re.compile(r'config\.architectures\[0\] == "(\w+)"')


def export_technique() -> Technique:
    """The ``export`` technique: ``--export compressor --export genai`` makes one variant of each."""
    return Technique(
        TECHNIQUE,
        help="which exporter makes a transformers causal LM's ONNX graph: compressor (its KV-cache export) "
             f"or genai (onnxruntime-genai's model builder, needs {PACKAGE}; fp32, or int4 with -q int4)",
        modes=(COMPRESSOR, GENAI),
        params={"builder_options": Param(str, "", "export genai: more model-builder options, KEY=VALUE words "
                                         "separated by spaces, e.g. 'algo_config=k_quant'")},
        cli=CliFlag("--export", metavar="EXPORTER", repeat=True,
                    help="compressor or genai (onnxruntime-genai's model builder); repeat for one variant each."),
        order=5,  # before every other step: it decides what the others work on
    )


@dataclass(frozen=True)
class GenaiPlan:
    """What the builder will make at save time: the handle of an ``export genai`` model."""

    #: The transformers folder the builder reads.
    source: Path
    precision: str = "fp32"
    #: Builder options (``extra_options``), in the order given.
    options: tuple[tuple[str, str], ...] = field(default=())


def genai_installed() -> bool:
    """onnxruntime-genai importable (found without importing it, or any framework)."""
    return importlib.util.find_spec("onnxruntime_genai") is not None


def check_export_steps(model: Model, steps: Sequence[Step]) -> list[Step]:
    """Refuse, before any work, what ``export`` cannot do; return the steps left for the
    backend's other checks (none after ``export genai``, which checks its own)."""
    exports = [index for index, step in enumerate(steps) if step.technique == TECHNIQUE]
    if not exports:
        return list(steps)
    if exports != [0]:
        raise UsageError(f"'{steps[exports[-1]]}' must be the variant's first step, and its only export")
    if steps[0].mode == COMPRESSOR:
        return list(steps[1:])
    if not genai_installed():
        raise UnsupportedError(f"'{steps[0]}' needs the {PACKAGE} package: pip install '{PACKAGE}>=0.18'")
    _check_source(model.source)
    for step in steps[1:]:
        if step.technique != "quantize" or step.mode != "int4" or len(steps) > 2:
            raise UnsupportedError(f"'{step}' cannot follow '{steps[0]}': onnxruntime-genai's builder makes fp32, "
                                   "or int4 with 'quantize int4' as the one step after it")
        algorithm = step.params.get("algorithm", "rtn")
        if algorithm != "rtn" and "algorithm" not in step.defaulted:
            raise UnsupportedError(f"'{step}' after '{steps[0]}': the builder quantizes round-to-nearest (or "
                                   "--set builder_options=algo_config=k_quant), not algorithm=" + str(algorithm))
    _split_options(str(steps[0].params.get("builder_options") or ""))
    return []


def _check_source(source: Path) -> None:
    """A transformers folder of an architecture the installed builder exports."""
    config_file = source / "config.json"
    if not source.is_dir() or not config_file.is_file():
        raise UnsupportedError(f"export genai builds from a Hugging Face transformers folder (config.json and "
                               f"weights); {source.name} is not one", source)
    try:
        architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        architectures = []
    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        raise UnsupportedError(f"export genai needs the model's tokenizer in the folder (one of "
                               f"{', '.join(TOKENIZER_FILES)}): onnxruntime-genai's builder copies it", source)
    known = builder_architectures()
    if known and (not architectures or architectures[0] not in known):
        named = architectures[0] if architectures else "no architecture in config.json"
        raise UnsupportedError(f"onnxruntime-genai's builder does not export {named}; it exports "
                               f"{', '.join(sorted(known))}", source)


def builder_architectures() -> frozenset[str]:
    """The architectures the installed builder dispatches on, read from its source (importing
    it would import torch and transformers); empty where its source is not laid out so."""
    spec = importlib.util.find_spec("onnxruntime_genai")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        try:
            text = (Path(location) / "models" / "builder.py").read_text(encoding="utf-8")
        except OSError:
            continue
        return frozenset(_ARCHITECTURE.findall(text)) - frozenset(_NOT_TEXT_DECODERS)
    return frozenset()


def _split_options(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for word in text.split():
        key, equals, value = word.partition("=")
        if not equals or not key:
            raise UsageError(f"builder_options: {word!r} is not KEY=VALUE")
        pairs.append((key, value))
    return tuple(pairs)


def genai_step(model: Model, step: Step, context: Context) -> Model:
    """``export compressor`` (the model as it is), ``export genai`` (a :class:`GenaiPlan`), or
    ``quantize int4`` on a plan (its precision and int4 options)."""
    if step.technique == TECHNIQUE and step.mode == COMPRESSOR:
        return Model(model.backend, model.source, model.format, model.handle, model.inputs, list(model.notes),
                     {**model.metadata, "exporter": "compressor"})
    if step.technique == TECHNIQUE:
        plan = GenaiPlan(model.source, options=_split_options(str(step.params.get("builder_options") or "")))
        metadata = {**model.metadata, "exporter": f"onnxruntime-genai {_version()} model builder"}
        return Model(model.backend, model.source, GENAI_FORMAT, plan, model.inputs, list(model.notes), metadata)
    plan = model.handle
    mapped = tuple((INT4_OPTIONS[name], _option_value(step.params[name])) for name in INT4_OPTIONS
                   if name in step.params and name not in step.defaulted)
    # Options of builder_options win over the quantize step's: they are the more specific.
    given = {key for key, _ in plan.options}
    options = tuple(pair for pair in mapped if pair[0] not in given) + plan.options
    notes = [*model.notes, "int4 by onnxruntime-genai's builder: " + (
        ", ".join(f"{key}={value}" for key, value in options) or "its default options")]
    return Model(model.backend, model.source, GENAI_FORMAT, replace(plan, precision="int4", options=options),
                 model.inputs, notes, {**model.metadata, "quantization": [str(step)]})


def _option_value(value: object) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "(version unknown)"
