"""Hugging Face causal LMs to GGUF, written by the ``gguf`` package one tensor at a time.

A compact converter for the architectures llama.cpp's ``convert_hf_to_gguf.py`` calls
``GPT2LMHeadModel`` (arch ``gpt2``), ``LlamaForCausalLM``/``MistralForCausalLM`` (arch
``llama``: rotary embeddings, grouped-query attention, Q and K rows permuted from Hugging
Face's half-split rotary layout to llama.cpp's interleaved one) and ``Qwen2ForCausalLM``
(arch ``qwen2``: q/k/v biases, NeoX rotary layout, nothing permuted) and ``Qwen3ForCausalLM``
(arch ``qwen3``: Qwen2's layout without biases, with an RMSNorm over each head's queries and
keys, ``attn_q_norm``/``attn_k_norm``, and a ``head_dim`` of its own) and ``Phi3ForCausalLM``
(arch ``phi3``: fused ``qkv_proj`` and ``gate_up_proj`` written as they are, NeoX rotary layout
over ``partial_rotary_factor`` of each head, the sliding window written for llama.cpp to apply
as transformers does). The same metadata
keys and tensor names as llama.cpp's converter, from ``gguf.TensorNameMap``; rotary scaling as
:mod:`compressor_gguf.rope` writes it (linear keys, Llama 3's ``rope_freqs.weight``), the
tokenizer as :mod:`compressor_gguf.vocab` does (byte-level BPE or SentencePiece).

:func:`plan_conversion` reads config.json, the weights' headers (safetensors; or a memory-mapped,
weights-only ``pytorch_model.bin``) and tokenizer.json only:
an unknown architecture, activation, rotary scaling, tensor or tokenizer is refused there,
before any work. :func:`write_gguf` then streams: tensor infos first, then each tensor
read from its memory map (or computed: ``rope_freqs``), transformed, cast and written, so the process holds one tensor
at a time (plus the memory-mapped pages the kernel keeps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.plugin import InvalidInputError, UnsupportedError
from compressor_gguf.rope import check_rope, llama3_factors, rope_settings, write_rope
from compressor_gguf.safetensors_reader import StoredTensor, folder_tensors, load, weight_files
from compressor_gguf.torch_bin import BinTensor, bin_tensors, has_bin, load_bin
from compressor_gguf.vocab import VocabPlan, plan_vocab

#: config.json model_type -> llama.cpp architecture name.
ARCHITECTURES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                 "phi3": "phi3"}
#: Buffers transformers may save that are no weights.
SKIPPED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
#: GPT-2's Conv1D weights are stored [in, out]; GGUF wants [out, in] like a Linear's.
CONV1D_SUFFIXES = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
#: Output tensor types: ``auto`` keeps the checkpoint's float type (lossless).
OUTTYPES = ("auto", "f32", "f16", "bf16")
#: gguf.LlamaFileType values of the float files written.
FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32}
GELU_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu")


@dataclass(frozen=True)
class ComputedTensor:
    """A tensor the converter computes from the config (Llama 3's ``rope_freqs``): no file."""

    values: tuple[float, ...]
    file: None = None


@dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor: where it comes from, its name and shape (NumPy order), how it changes."""

    source: StoredTensor | BinTensor | ComputedTensor
    name: str
    shape: tuple[int, ...]
    transform: str  # "", "transpose", "permute:HEADS"
    outtype: str  # "f32", "f16", "bf16"

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * (4 if self.outtype == "f32" else 2)


@dataclass(frozen=True)
class ConversionPlan:
    """Everything :func:`write_gguf` needs, found without reading a weight."""

    folder: Path
    model_type: str
    arch: str
    config: dict[str, Any]
    tensors: tuple[TensorPlan, ...]
    vocab: VocabPlan
    outtype: str
    notes: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors)

    @property
    def source_files(self) -> set[Path]:
        """The weight files the tensors are read from."""
        return {tensor.source.file for tensor in self.tensors if tensor.source.file is not None}


def read_config(folder: Path) -> dict[str, Any]:
    from compressor_frontends.pytorch.hf import read_json, refuse_custom_code

    config = read_json(folder, "config.json")
    if not isinstance(config, dict):
        raise InvalidInputError("has a config.json that is not a JSON object", folder)
    refuse_custom_code(folder, config)
    return config


def architecture(folder: Path, config: dict[str, Any]) -> str:
    """The config's model_type when the converter knows it; else one line, exit 5."""
    model_type = str(config.get("model_type", ""))
    if model_type not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedError(f"model_type {model_type or 'missing'!r} is not one compressor's GGUF converter "
                               f"knows ({known})", folder)
    classes = [str(name) for name in config.get("architectures") or []]
    if classes and not any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in classes):
        raise UnsupportedError(f"is a {classes[0]}, not a causal language model (...ForCausalLM, GPT2LMHeadModel): "
                               "llama.cpp would compute next-token logits it does not have", folder)
    return model_type


def _number(config: dict[str, Any], folder: Path, *keys: str, default: Any = None) -> Any:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
    if default is not None:
        return default
    raise InvalidInputError(f"config.json has no {' or '.join(keys)}", folder)


def check_config(model_type: str, config: dict[str, Any], folder: Path) -> None:
    """Refuse settings llama.cpp's architecture would silently run differently."""
    if model_type == "gpt2":
        activation = config.get("activation_function", "gelu_new")
        if activation not in GELU_ACTIVATIONS:
            raise UnsupportedError(f"GPT-2 with activation {activation!r}: llama.cpp's gpt2 runs GELU", folder)
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if config.get(flag):
                raise UnsupportedError(f"GPT-2 with {flag}=true: llama.cpp's gpt2 does not implement it", folder)
        return
    activation = config.get("hidden_act", "silu")
    if activation != "silu":
        raise UnsupportedError(f"{model_type} with hidden_act {activation!r}: llama.cpp's {ARCHITECTURES[model_type]} "
                               "runs SiLU", folder)
    check_rope(config, ARCHITECTURES[model_type], folder)
    if model_type in ("qwen2", "qwen3") and config.get("use_sliding_window"):
        raise UnsupportedError(f"{model_type} with use_sliding_window=true: llama.cpp's {model_type} attends to "
                               "every token", folder)
    if model_type == "qwen3" and config.get("attention_bias"):
        raise UnsupportedError("qwen3 with attention_bias=true: llama.cpp's qwen3 has no q/k/v biases", folder)


def plan_conversion(folder: Path, outtype: str = "auto") -> ConversionPlan:
    """Read config.json, the safetensors headers and tokenizer.json; refuse what cannot be converted."""
    import gguf

    config = read_config(folder)
    model_type = architecture(folder, config)
    check_config(model_type, config, folder)
    arch = ARCHITECTURES[model_type]
    blocks = int(_number(config, folder, "n_layer", "num_hidden_layers"))
    heads = int(_number(config, folder, "n_head", "num_attention_heads"))
    kv_heads = int(_number(config, folder, "num_key_value_heads", default=heads))
    vocab_size = int(_number(config, folder, "vocab_size"))
    stored = stored_tensors(folder)
    floats = {tensor.dtype for tensor in stored.values() if tensor.dtype in ("F32", "F16", "BF16")}
    chosen = outtype
    if outtype == "auto":
        chosen = "f32" if not floats or "F32" in floats or len(floats) > 1 else floats.pop().lower()
    mapping = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), blocks)
    plans = []
    for name in sorted(stored, key=_layer_order):
        if name.endswith(SKIPPED_SUFFIXES):
            continue
        mapped = mapping.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise UnsupportedError(f"holds the tensor {name[:80]!r}, which llama.cpp's {arch} has no place for",
                                   folder)
        tensor = stored[name]
        transform, shape = "", tensor.shape
        if model_type == "gpt2" and name.endswith(CONV1D_SUFFIXES):
            transform, shape = "transpose", tuple(reversed(shape))
        elif arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            transform = f"permute:{heads}"
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            transform = f"permute:{kv_heads}"
        plans.append(TensorPlan(tensor, mapped, shape, transform, chosen if len(shape) > 1 else "f32"))
    factors = llama3_factors(config, head_dimension(config, folder))
    if factors is not None:  # llama.cpp's converter writes it first (generate_extra_tensors)
        plans.insert(0, TensorPlan(ComputedTensor(factors), "rope_freqs.weight", (len(factors),), "", "f32"))
    embedding = next((plan for plan in plans if plan.name == "token_embd.weight"), None)
    if embedding is None or embedding.shape[0] != vocab_size:
        rows = "no token embedding" if embedding is None else f"{embedding.shape[0]} embedding rows"
        raise InvalidInputError(f"has {rows} for config vocab_size {vocab_size}", folder)
    tied = config.get("tie_word_embeddings", model_type == "gpt2")
    if not tied and not any(plan.name == "output.weight" for plan in plans):
        raise InvalidInputError("has no lm_head.weight and untied embeddings (tie_word_embeddings=false)", folder)
    vocab = plan_vocab(folder, vocab_size, arch)
    notes = []
    if not vocab.pre_known:
        notes.append("tokenizer pre-type unknown to llama.cpp: written as 'default' (compressor feeds token ids, "
                     "so the measurements stand; llama.cpp tokenizing raw text may split it differently)")
    if model_type == "mistral" and config.get("sliding_window"):
        notes.append(f"sliding_window {config['sliding_window']} dropped: llama.cpp's llama attends to every "
                     "token (identical for sequences up to the window)")
    return ConversionPlan(folder, model_type, arch, config, tuple(plans), vocab, chosen, tuple(notes))


def head_dimension(config: dict[str, Any], folder: Path) -> int:
    heads = int(_number(config, folder, "n_head", "num_attention_heads"))
    return int(config.get("head_dim") or _number(config, folder, "n_embd", "hidden_size") // heads)


def stored_tensors(folder: Path) -> dict[str, StoredTensor | BinTensor]:
    """The folder's tensors (headers only): safetensors, else pytorch_model.bin (needs torch)."""
    if not any(folder.glob("*.safetensors")) and has_bin(folder):
        return dict(bin_tensors(folder))
    return dict(folder_tensors(folder, weight_files(folder)))


def gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "?"


def _layer_order(name: str) -> tuple[int, str]:
    """Tensors by block number, so the file reads like llama.cpp's converter's."""
    digits = [part for part in name.split(".") if part.isdigit()]
    return (int(digits[0]) if digits else -1, name)


def write_metadata(writer: Any, plan: ConversionPlan) -> None:
    config, folder = plan.config, plan.folder
    blocks = int(_number(config, folder, "n_layer", "num_hidden_layers"))
    writer.add_name(folder.name)
    writer.add_block_count(blocks)
    writer.add_file_type(FILE_TYPES[plan.outtype])
    if plan.model_type == "gpt2":
        width = int(_number(config, folder, "n_embd"))
        writer.add_context_length(int(_number(config, folder, "n_positions", "n_ctx")))
        writer.add_embedding_length(width)
        writer.add_feed_forward_length(int(config.get("n_inner") or 4 * width))
        writer.add_head_count(int(_number(config, folder, "n_head")))
        writer.add_layer_norm_eps(float(_number(config, folder, "layer_norm_epsilon", default=1e-5)))
        return
    width = int(_number(config, folder, "hidden_size"))
    heads = int(_number(config, folder, "num_attention_heads"))
    head_dim = head_dimension(config, folder)
    writer.add_context_length(int(_number(config, folder, "max_position_embeddings")))
    writer.add_embedding_length(width)
    writer.add_feed_forward_length(int(_number(config, folder, "intermediate_size")))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(_number(config, folder, "num_key_value_heads", default=heads)))
    writer.add_layer_norm_rms_eps(float(_number(config, folder, "rms_norm_eps", default=1e-6)))
    write_rope(writer, config)
    if plan.arch == "llama":
        writer.add_vocab_size(int(_number(config, folder, "vocab_size")))
        writer.add_rope_dimension_count(head_dim)
    if plan.arch == "phi3":  # Phi3MiniModel.set_gguf_parameters
        rotated = float(rope_settings(config).get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
        writer.add_rope_dimension_count(int(rotated * width) // heads)
        writer.add_rope_scaling_orig_ctx_len(int(_number(config, folder, "original_max_position_embeddings",
                                                         "max_position_embeddings")))
        writer.add_sliding_window(int(config.get("sliding_window") or 0))
    if config.get("head_dim") and head_dim != width // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def permute(weights: Any, heads: int) -> Any:
    """Hugging Face's rotary halves to llama.cpp's interleaved pairs (``LlamaModel.permute``)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def tensor_data(plan: TensorPlan) -> tuple[Any, Any]:
    """The tensor's bytes as written (an array) and its raw GGML type, or None for f32/f16."""
    import gguf
    import numpy as np

    source = plan.source
    if isinstance(source, ComputedTensor):
        return np.asarray(source.values, dtype=np.float32), None
    array = (load_bin(source) if isinstance(source, BinTensor) else load(source)).astype(np.float32, copy=False)
    if plan.transform == "transpose":
        array = np.ascontiguousarray(array.T)
    elif plan.transform.startswith("permute:"):
        array = permute(array, int(plan.transform.split(":")[1]))
    if plan.outtype == "bf16":
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return np.ascontiguousarray(array.astype(np.float16 if plan.outtype == "f16" else np.float32)), None


def write_gguf(plan: ConversionPlan, path: Path, progress: Callable[[str, float | None], None] | None = None) -> None:
    """Write the GGUF file, streaming the tensors one at a time."""
    import gguf
    import numpy as np

    from compressor_gguf.vocab import write_vocab

    writer = gguf.GGUFWriter(path, plan.arch)
    try:
        write_metadata(writer, plan)
        write_vocab(writer, plan.vocab)
        for tensor in plan.tensors:
            raw = gguf.GGMLQuantizationType.BF16 if tensor.outtype == "bf16" else None
            dtype = np.dtype(np.float32 if tensor.outtype == "f32" else np.float16)
            writer.add_tensor_info(tensor.name, tensor.shape, dtype, tensor.nbytes, raw_dtype=raw)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for index, tensor in enumerate(plan.tensors):
            data, _ = tensor_data(tensor)
            writer.write_tensor_data(data)
            del data
            if progress is not None:
                progress("converting to GGUF", (index + 1) / len(plan.tensors))
        writer.flush()
    finally:
        writer.close()
