"""The ``gguf`` backend: Hugging Face causal LMs and GGUF files, quantized and run by llama.cpp.

Reads ``.gguf`` files (identified by suffix or magic) and Hugging Face causal-LM folders
with ``--backend gguf`` (the onnx backend claims transformers folders by default):
GPT-2, Llama/Mistral and Qwen2 (byte-level BPE or SentencePiece tokenizers; linear and Llama 3
rotary scaling), converted by :mod:`compressor_gguf.convert` (refused in one line, exit 5, at
load when the converter does not know the model). ``quantize`` runs
llama.cpp's quantizer (``q8_0``, ``q4_0``, ``q4_k_m``, ``q5_k_m``, ``fp16``; the shared
``dynamic`` is ``q8_0`` and ``int4`` is ``q4_0``, see docs/backends/gguf.md) in a forked
child; saving writes the ``.gguf``; the runtime is llama.cpp's (:mod:`compressor_gguf.runtime`).
The conversion is made once per run and shared by every variant.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from compressor.plugin import (
    GENERATION_OPTIONS,
    ORDER,
    QUANTIZE_OPTION,
    TOKEN_INPUTS,
    Artifact,
    Backend,
    Context,
    Dataset,
    MeasureSettings,
    Model,
    Param,
    Runtime,
    SampleModel,
    Step,
    Technique,
    TensorSpec,
    UnsupportedError,
    UsageError,
    hookimpl,
    run_in_fork,
)
from compressor_gguf.quantize import ALIASES, FLOAT_TENSOR_TYPES, FTYPES, SIZE_SHARES, ftype_name

NAME = "gguf"
MAGIC = b"GGUF"
MODES = (*FTYPES, *ALIASES)


@dataclass
class Conversion:
    """The model as a GGUF file: the user's ``.gguf``, or an HF folder converted on first use
    (into the run's workdir). Forks share it, so the conversion happens once per run."""

    plan: Any = None  # a ConversionPlan for a Hugging Face folder
    source: Path | None = None  # the user's .gguf file
    path: Path | None = None

    def gguf_path(self, context: Context) -> Path:
        if self.source is not None:
            return self.source
        if self.path is None:
            from compressor_gguf.convert import write_gguf

            if context.workdir is None:
                raise UsageError("converting to GGUF needs the run's work folder")
            target = context.workdir / f"gguf-converted-{uuid.uuid4().hex[:8]}.gguf"
            try:
                write_gguf(self.plan, target, context.progress)
            except BaseException:
                target.unlink(missing_ok=True)
                raise
            self.path = target
        return self.path


@dataclass(frozen=True)
class GgufModel:
    """The handle: the shared conversion, and this variant's quantized file (None: unquantized)."""

    conversion: Conversion
    quantized: Path | None = None
    ftype: str | None = None


def backend() -> Backend:
    from compressor_frontends.pytorch.techniques import text_options

    return Backend(
        name=NAME,
        description="Hugging Face causal LMs and GGUF files, quantized and run by llama.cpp",
        formats=(".gguf", "transformers causal-LM folder (gpt2, llama, mistral, qwen2, qwen3, phi3) with --backend gguf"),
        techniques={"quantize": Technique(
            "quantize",
            help="llama.cpp quantization: q8_0, q4_0, q4_k_m, q5_k_m, fp16 (dynamic = q8_0, int4 = q4_0)",
            modes=MODES,
            candidates=("quantize q8_0", "quantize q5_k_m", "quantize q4_k_m", "quantize q4_0"),
            cli=QUANTIZE_OPTION, size_factor=SIZE_SHARES, order=ORDER["quantize"],
        )},
        options={
            "outtype": Param(str, "auto", "weights of the converted GGUF (auto: the checkpoint's float type)",
                             choices=("auto", "f32", "f16", "bf16")),
            "n_ctx": Param(int, None, "llama.cpp context when measuring (default 256, grown for longer rows)",
                           minimum=8),
            **text_options(),
            **GENERATION_OPTIONS,
        },
        extra="gguf",
        requires=("gguf", "llama_cpp"),
        runtime_imports=("llama_cpp",),
        distributions=("gguf", "llama-cpp-python", "sentencepiece"),  # sentencepiece reads tokenizer.model
        default_variants=(("quantize q8_0",), ("quantize q4_k_m",)),
    )


@hookimpl
def compressor_backends() -> Iterator[Backend]:
    yield backend()


@hookimpl
def compressor_identify(path: Path) -> str | None:
    if not path.is_file():
        return None
    if path.suffix.lower() == ".gguf":
        return NAME
    try:
        with path.open("rb") as stream:
            return NAME if stream.read(4) == MAGIC else None
    except OSError:
        return None


@hookimpl
def compressor_load(path: Path, backend: str, context: Context) -> Model:
    if path.is_dir():
        from compressor_gguf.convert import gguf_version, plan_conversion

        plan = plan_conversion(path, str(context.options.get("outtype") or "auto"))
        weights = sum(file.stat().st_size for file in plan.source_files)
        return Model(NAME, path, "hf", GgufModel(Conversion(plan=plan)), TOKEN_INPUTS, notes=list(plan.notes),
                     metadata={"architecture": plan.arch, "converted_weights": plan.outtype,
                               "converter": f"compressor_gguf with gguf {gguf_version()}",
                               "tokenizer": f"llama.cpp {plan.vocab.model} from {plan.vocab.source}"},
                     source_bytes=weights)
    with path.open("rb") as stream:
        if stream.read(4) != MAGIC:
            raise UnsupportedError("the gguf backend reads .gguf files and Hugging Face causal-LM folders", path)
    from compressor_gguf.quantize import file_facts

    facts = file_facts(path)
    return Model(NAME, path, "gguf", GgufModel(Conversion(source=path)), TOKEN_INPUTS,
                 metadata={"architecture": facts.get("architecture"), "source_file_type": facts.get("file_type"),
                           "source_tensor_types": facts["tensor_types"]},
                 source_bytes=path.stat().st_size)


@hookimpl
def compressor_load_data(path: Path, purpose: str, inputs: tuple[TensorSpec, ...], limit: int | None,
                         model_path: Path | None, context: Context | None) -> Dataset | None:
    """Text (``.txt``, ``.jsonl``) tokenized with the model folder's tokenizer; core reads ``.npz``."""
    from compressor_frontends.pytorch.text_data import text_dataset

    return text_dataset(path, purpose, inputs, limit, model_path, context)


@hookimpl
def compressor_check_steps(model: Model, steps: Sequence[Step], context: Context) -> None:
    quantizing = [step for step in steps if step.technique == "quantize"]
    if len(quantizing) > 1:
        raise UsageError(f"'{' + '.join(str(step) for step in quantizing)}': one quantize step per variant "
                         "(llama.cpp would quantize an already quantized file)")
    quantized = set(model.metadata.get("source_tensor_types") or ()) - set(FLOAT_TENSOR_TYPES)
    if quantizing and model.format == "gguf" and quantized:
        source_type = model.metadata.get("source_file_type") or ", ".join(sorted(quantized))
        raise UnsupportedError(f"'{quantizing[0]}': the file is already quantized ({source_type}); "
                               "quantize from its f32/f16/bf16 GGUF or the Hugging Face folder", model.source)


@hookimpl
def compressor_fork(model: Model, context: Context) -> Model:
    # compress writes a new file and never changes the shared conversion: variants share it.
    return replace(model, notes=list(model.notes), metadata=dict(model.metadata))


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@hookimpl
def compressor_compress(model: Model, step: Step, context: Context) -> Model:
    from compressor_gguf.quantize import quantize_file

    handle: GgufModel = model.handle
    source = handle.conversion.gguf_path(context)
    assert context.workdir is not None  # gguf_path refuses a run without one
    target = context.workdir / f"gguf-{step.slug}-{uuid.uuid4().hex[:8]}.gguf"
    mode, ftype = str(step.mode), ftype_name(str(step.mode))
    context.progress(f"llama.cpp quantizing to {ftype}", None)
    try:
        run_in_fork(quantize_file, source, target, mode, cpu_threads(), step=step)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    notes = list(model.notes)
    alias = f" ('{mode}' on this backend)" if mode in ALIASES else ""
    notes.append(f"quantized to {ftype}{alias} by llama.cpp's llama_model_quantize")
    return replace(model, format="gguf", handle=GgufModel(handle.conversion, target, ftype), notes=notes,
                   metadata={**model.metadata, "llama_cpp_ftype": ftype})


def link_or_copy(source: Path, target: Path, own: bool) -> None:
    """A hard link to a file of this run where the file system allows one (no second copy on
    disk), else a copy; the user's own file is always copied, never shared with the output."""
    if own:
        try:
            os.link(source, target)
            return
        except OSError:
            pass
    shutil.copyfile(source, target)


@hookimpl
def compressor_save(model: Model, destination: Path, context: Context) -> Artifact:
    from compressor_gguf.quantize import file_facts

    handle: GgufModel = model.handle
    target = destination.with_suffix(".gguf")
    source = handle.quantized or handle.conversion.gguf_path(context)
    link_or_copy(source, target, own=source != handle.conversion.source)
    facts = file_facts(target)
    return Artifact(NAME, target, "gguf", metadata={"gguf_" + key: value for key, value in facts.items()})


@hookimpl
def compressor_open_runtime(artifact: Artifact, settings: MeasureSettings) -> Runtime:
    from compressor_gguf.runtime import LlamaCppRuntime

    return LlamaCppRuntime(artifact, settings)


@hookimpl
def compressor_sample_models(directory: Path) -> list[SampleModel]:
    from compressor_gguf.samples import write_gpt2_sample

    folder, eval_data = write_gpt2_sample(directory)
    # One variant: core times each against the original to +-3% (up to a minute on a busy machine).
    return [SampleModel(NAME, "tiny-gpt2", folder, (("quantize q4_k_m",),),
                        eval_data=eval_data, options={},
                        description="2-layer GPT-2 (256 wide), random weights, byte-level tokenizer")]
