"""Rotary-embedding scaling written as llama.cpp's converter writes it.

* ``linear`` (position interpolation): ``rope.scaling.type = linear`` and ``rope.scaling.factor``
  (``TextModel.set_gguf_parameters``); llama.cpp divides positions by the factor, for every
  architecture.
* ``llama3`` (Llama 3.1-3.3): no key; a ``rope_freqs.weight`` tensor of ``head_dim / 2``
  factors that llama.cpp's ``llama`` architecture divides each rotary frequency by
  (``LlamaModel.generate_extra_tensors``): 1 for wavelengths under
  ``original_max_position_embeddings / high_freq_factor``, ``factor`` above
  ``original_max_position_embeddings / low_freq_factor``, smoothly between. llama.cpp's ``qwen2``
  and ``qwen3`` read no such tensor, so llama3 scaling is refused there.

* ``yarn`` (Qwen2.5's and Qwen3's long context, YaRN-extended Llamas), for ``llama``, ``qwen2``
  and ``qwen3``:
  ``rope.scaling.type = yarn``, ``rope.scaling.factor``, ``rope.scaling.original_context_length``
  and, where the config sets them, ``yarn_beta_fast``/``yarn_beta_slow``/``yarn_ext_factor``
  (``TextModel.set_gguf_parameters``). llama.cpp then blends interpolated and extrapolated
  frequencies over the same floored/ceiled correction range as transformers and scales cos and
  sin by ``0.1 ln(factor) + 1``, transformers' default attention factor. A config's
  ``attention_factor`` (or ``mscale``/``mscale_all_dim`` pair) is written as
  ``rope.scaling.attn_factor``, relative to that default, the key llama.cpp multiplies it by: the
  converter's ``rope.scaling.yarn_attn_factor`` llama.cpp overwrites for yarn (measured). Refused
  by name, where llama.cpp as compressor runs it would compute otherwise: ``truncate: false``
  (llama.cpp always rounds the range), ``beta_fast``/``beta_slow`` other than 32/1
  (llama-cpp-python passes 32 and 1; llama.cpp ran those whatever the file said, measured), an
  ``extrapolation_factor`` other than 1 (transformers ignores it, llama.cpp would apply it).

``phi3`` is written for the default rotation only (Phi-3's ``longrope`` takes the converter's
``rope_factors_long``/``rope_factors_short`` tensors, which compressor does not write). Anything
else (``dynamic``, ``longrope``, ...) is refused by name before any work.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from compressor.plugin import UnsupportedError

#: rope_type -> the llama.cpp architectures compressor writes it for.
SUPPORTED = {"default": ("gpt2", "llama", "qwen2", "qwen3", "phi3"), "linear": ("llama", "qwen2", "qwen3"),
             "llama3": ("llama",), "yarn": ("llama", "qwen2", "qwen3")}
#: transformers' YaRN defaults (``_compute_yarn_parameters``): llama-cpp-python passes the same to llama.cpp.
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0
#: The yarn keys that must be numbers where present.
YARN_NUMBERS = ("factor", "attention_factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow",
                "extrapolation_factor", "original_max_position_embeddings")


def rope_settings(config: dict[str, Any]) -> dict[str, Any]:
    """Rotary settings, in transformers 5's ``rope_parameters`` or the older ``rope_scaling`` and
    top-level keys (llama.cpp's ``TextModel.__init__``; a per-attention-type ``full_attention``
    entry stands for the whole)."""
    found = dict(config.get("rope_scaling") or {})
    found.update(config.get("rope_parameters") or {})
    if isinstance(found.get("full_attention"), dict):
        found = dict(found["full_attention"])
    if "rope_theta" not in found and "rope_theta" in config:
        found["rope_theta"] = config["rope_theta"]
    if "original_max_position_embeddings" not in found and "original_max_position_embeddings" in config:
        found["original_max_position_embeddings"] = config["original_max_position_embeddings"]
    return found


def rope_type(config: dict[str, Any]) -> str:
    settings = rope_settings(config)
    return str(settings.get("rope_type") or settings.get("type") or "default").lower()


def check_rope(config: dict[str, Any], arch: str, folder: Path) -> None:
    """Refuse, by name, a scaling llama.cpp would run differently or compressor does not write."""
    kind = rope_type(config)
    if arch not in SUPPORTED.get(kind, ()):
        written = ", ".join(name for name, archs in SUPPORTED.items() if arch in archs)
        raise UnsupportedError(f"rotary scaling {kind!r} is not one compressor's GGUF converter writes for "
                               f"llama.cpp's {arch} ({written})", folder)
    if kind in ("linear", "llama3", "yarn") and not isinstance(rope_settings(config).get("factor"), int | float):
        raise UnsupportedError(f"rotary scaling {kind!r} without a numeric factor", folder)
    if kind == "yarn" and (problem := yarn_problem(config)) is not None:
        raise UnsupportedError(f"rotary scaling 'yarn' with {problem}", folder)


def yarn_problem(config: dict[str, Any]) -> str | None:
    """What in a yarn setting llama.cpp (opened by llama-cpp-python, as compressor runs it) would
    compute otherwise than transformers' ``_compute_yarn_parameters``; None when nothing."""
    settings = rope_settings(config)
    values = {key: settings.get(key) for key in YARN_NUMBERS}
    if "original_max_position_embeddings" in config:  # read before the setting's (yarn_original_context)
        values["original_max_position_embeddings"] = config["original_max_position_embeddings"]
    for key, value in values.items():
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            return f"a {key} that is no number ({str(value)[:40]!r})"
    if settings.get("truncate", True) is False:
        return ("truncate=false: llama.cpp rounds the correction range out to whole dimensions "
                "(ggml_rope_yarn_corr_dims), as transformers does only with truncate=true")
    for key, default in (("beta_fast", YARN_BETA_FAST), ("beta_slow", YARN_BETA_SLOW)):
        value = settings.get(key) or default  # transformers: ``or 32``, ``or 1``
        if float(value) != default:
            return f"{key} {value:g}: llama.cpp as llama-cpp-python opens it runs {default:g} whatever the file says"
    extrapolation = settings.get("extrapolation_factor")
    if extrapolation is not None and float(extrapolation) != 1.0:
        return (f"extrapolation_factor {extrapolation:g}: transformers ignores it, llama.cpp would mix "
                "interpolated and extrapolated angles by it")
    return None


def yarn_original_context(config: dict[str, Any]) -> int:
    """The context yarn stretches, as transformers 5's ``standardize_rope_params`` finds it: a
    top-level ``original_max_position_embeddings`` first (Phi-3's place), then the setting's, then
    ``max_position_embeddings``."""
    nested = isinstance((config.get("rope_parameters") or {}).get("full_attention"), dict)
    if "original_max_position_embeddings" in config and not nested:
        return int(config["original_max_position_embeddings"])
    return int(rope_settings(config).get("original_max_position_embeddings") or config["max_position_embeddings"])


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention scale, ``0.1 mscale ln(factor) + 1`` (transformers' ``yarn_get_mscale``,
    llama.cpp's ``get_mscale``)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(settings: dict[str, Any]) -> float:
    """The factor transformers multiplies cos and sin by: ``attention_factor``, else the ratio of
    ``mscale`` to ``mscale_all_dim``'s scales where both are set, else ``yarn_mscale(factor)``."""
    factor = float(settings["factor"])
    if settings.get("attention_factor") is not None:
        return float(settings["attention_factor"])
    if settings.get("mscale") and settings.get("mscale_all_dim"):
        return yarn_mscale(factor, float(settings["mscale"])) / yarn_mscale(factor, float(settings["mscale_all_dim"]))
    return yarn_mscale(factor)


def write_rope(writer: Any, config: dict[str, Any]) -> None:
    """``rope.freq_base`` and, for linear and yarn scaling, their keys (``TextModel.set_gguf_parameters``)."""
    import gguf

    settings = rope_settings(config)
    writer.add_rope_freq_base(float(settings.get("rope_theta", 10000.0)))
    kind = rope_type(config)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(settings["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(settings["factor"]))
        writer.add_rope_scaling_orig_ctx_len(yarn_original_context(config))
        if settings.get("extrapolation_factor") is not None:
            writer.add_rope_scaling_yarn_ext_factor(float(settings["extrapolation_factor"]))
        if settings.get("beta_fast"):
            writer.add_rope_scaling_yarn_beta_fast(float(settings["beta_fast"]))
        if settings.get("beta_slow"):
            writer.add_rope_scaling_yarn_beta_slow(float(settings["beta_slow"]))
        # llama.cpp scales cos and sin by yarn_mscale(factor) times rope.scaling.attn_factor (llama_context's
        # constructor); the converter's rope.scaling.yarn_attn_factor it overwrites for yarn (measured).
        relative = yarn_attention_factor(settings) / yarn_mscale(float(settings["factor"]))
        if abs(relative - 1.0) > 1e-7:
            writer.add_rope_scaling_attn_factors(relative)


def llama3_factors(config: dict[str, Any], head_dim: int) -> tuple[float, ...] | None:
    """The ``rope_freqs.weight`` values for llama3 scaling (None for any other), computed as
    llama.cpp's converter does: frequencies in float32, factors in Python floats."""
    import numpy as np

    if rope_type(config) != "llama3":
        return None
    settings = rope_settings(config)
    base = float(settings.get("rope_theta", 10000.0))
    factor = float(settings.get("factor", 8.0))
    low_freq_factor = float(settings.get("low_freq_factor", 1.0))
    high_freq_factor = float(settings.get("high_freq_factor", 4.0))
    old_context = float(settings.get("original_max_position_embeddings", 8192))
    low_freq_wavelen, high_freq_wavelen = old_context / low_freq_factor, old_context / high_freq_factor
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    frequencies = (np.float32(1.0) / (np.float32(base) ** exponents)).astype(np.float32)
    factors = []
    for frequency in frequencies.tolist():
        wavelen = 2 * math.pi / frequency
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return tuple(factors)
