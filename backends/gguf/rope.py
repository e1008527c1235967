"""Rotary-embedding scaling written as llama.cpp's converter writes it.

* ``linear`` (position interpolation): ``rope.scaling.type = linear`` and ``rope.scaling.factor``
  (``TextModel.set_gguf_parameters``); llama.cpp divides positions by the factor, for every
  architecture.
* ``llama3`` (Llama 3.1-3.3): no key; a ``rope_freqs.weight`` tensor of ``head_dim / 2``
  factors that llama.cpp's ``llama`` architecture divides each rotary frequency by
  (``LlamaModel.generate_extra_tensors``): 1 for wavelengths under
  ``original_max_position_embeddings / high_freq_factor``, ``factor`` above
  ``original_max_position_embeddings / low_freq_factor``, smoothly between. llama.cpp's ``qwen2``
  reads no such tensor, so llama3 scaling is refused there.

Anything else (``yarn``, ``dynamic``, ``longrope``, ...) is refused by name before any work.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from compressor.plugin import UnsupportedError

#: rope_type -> the llama.cpp architectures compressor writes it for.
SUPPORTED = {"default": ("gpt2", "llama", "qwen2"), "linear": ("llama", "qwen2"), "llama3": ("llama",)}


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
    if kind in ("linear", "llama3") and not isinstance(rope_settings(config).get("factor"), int | float):
        raise UnsupportedError(f"rotary scaling {kind!r} without a numeric factor", folder)


def write_rope(writer: Any, config: dict[str, Any]) -> None:
    """``rope.freq_base`` and, for linear scaling, its type and factor."""
    import gguf

    settings = rope_settings(config)
    writer.add_rope_freq_base(float(settings.get("rope_theta", 10000.0)))
    if rope_type(config) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(settings["factor"]))


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
