"""Fused attention applied to a generation-ready export, and checked before it is kept.

:func:`fuse_export` runs :func:`compressor_onnx.kv_fusion.fuse_attention` on the export of
a transformers causal LM (rotary positions, or none: GPT-2). It first proves the pass on a miniature of
the same architecture (the model's config with two layers, a small vocabulary and MLP, random
weights): exported unfused and fused, both run in ONNX Runtime on a left-padded batch of two
(prefill, then decode steps) and on a one-row chunked prefill, and the logits and cache
entries of every real (unpadded) position must agree within 1e-4. Only then is the real
graph rewritten, so the check costs a few seconds and no copy of the real weights. A model
the pass does not recognize, a rotary embedding that depends on the sequence length (dynamic
NTK, LongRoPE), or a failed check leave the export as it was.

Limit of the fused graph (ONNX Runtime's ``GroupQueryAttention``): a step that appends more
than one token to a non-empty cache must be at batch 1 (prefill at any batch, decode at any
batch, chunked prefill at batch 1); compressor's generation never does otherwise.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from compressor.plugin import Context
from compressor_frontends.pytorch import TorchModel
from compressor_onnx.kv_fusion import AttentionShape, fuse_attention, recognizes

#: Agreement required between the miniature's unfused and fused graphs (absolute, fp32).
TOLERANCE = 1e-4
_MINI_LAYERS, _MINI_VOCABULARY, _MINI_MLP = 2, 128, 32


def fuse_export(model: TorchModel, graph: Any | None, path: Path | None, context: Context) -> int:
    """Fuse the attention of an export (``graph`` in memory, changed in place, or the graph
    file at ``path``, rewritten in place): the layers fused, 0 where the export stays as it was."""
    import onnx

    module = model.module
    tables = rotary_tables(module)
    shape = attention_shape(module)
    if (tables is None and has_rotary(module)) or shape is None:
        return 0
    proto = graph if graph is not None else onnx.load(str(path), load_external_data=False)
    if not recognizes(proto) or not miniature_agrees(model, shape, context):
        return 0
    fused = fuse_attention(proto, shape, *_tables_as(tables, proto))
    if fused and graph is None:
        onnx.save_model(proto, str(path))  # the graph alone: its external data stays as written
    return fused


def attention_shape(module: Any) -> AttentionShape | None:
    """Query heads, key/value heads and head size from the model's config, or None."""
    config = getattr(module, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if not all(isinstance(value, int) and value > 0 for value in (heads, kv_heads, head_dim)):
        return None
    return AttentionShape(int(heads), int(kv_heads), int(head_dim))


def has_rotary(module: Any) -> bool:
    """Whether the model has a rotary-position module (Llama's ``LlamaRotaryEmbedding``)."""
    return _rotary_module(module) is not None


def _rotary_module(module: Any) -> Any | None:
    return next((child for _, child in module.named_modules() if type(child).__name__.endswith("RotaryEmbedding")),
                None)


def rotary_tables(module: Any) -> tuple[Any, Any] | None:
    """The model's rotary cos and sin for positions ``0 .. max_positions - 1``, each
    ``[positions, head_dim / 2]`` (rotate-half layout), or None: no rotary module, no known
    context length, a table that changes with the sequence length, or another layout."""
    import numpy as np
    import torch

    from compressor_frontends.pytorch.kv_export import max_positions

    rotary = _rotary_module(module)
    limit = max_positions(module)
    shape = attention_shape(module)
    if rotary is None or not limit or shape is None or str(getattr(rotary, "rope_type", "default")) in (
            "dynamic", "longrope"):
        return None
    try:
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(limit)[None])
            short_cos, _ = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(8)[None])
    except Exception:  # noqa: BLE001 - a model's own rotary module may raise anything
        return None
    cos, sin = cos[0].float().numpy(), sin[0].float().numpy()
    half = shape.head_dim // 2
    if cos.shape != (limit, shape.head_dim) or not np.array_equal(cos[:, :half], cos[:, half:]) \
            or not np.array_equal(short_cos[0].float().numpy(), cos[:8]):
        return None
    return np.ascontiguousarray(cos[:, :half]), np.ascontiguousarray(sin[:, :half])


def _tables_as(tables: tuple[Any, Any] | None, graph: Any) -> tuple[Any, Any] | tuple[None, None]:
    """The tables in the element type of the graph's cache (none without rotary positions)."""
    from onnx import helper

    if tables is None:
        return None, None
    past = next(value for value in graph.graph.input if value.name.startswith("past_key_values."))
    dtype = helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type)
    return tables[0].astype(dtype), tables[1].astype(dtype)


def miniature(module: Any) -> Any | None:
    """The same architecture, two layers, a small vocabulary and MLP, random weights."""
    import torch

    config = copy.deepcopy(module.config)
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < 1:
        return None
    for name, value in vars(config).items():
        if isinstance(value, list) and len(value) == layers:  # per-layer settings (layer_types)
            setattr(config, name, value[:_MINI_LAYERS])
    config.num_hidden_layers = min(layers, _MINI_LAYERS)
    config.vocab_size = _MINI_VOCABULARY
    for name in ("intermediate_size", "n_inner"):
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, _MINI_MLP)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= _MINI_VOCABULARY:
            setattr(config, name, 0)
    torch.manual_seed(0)
    try:
        return type(module)(config).eval()
    except Exception:  # noqa: BLE001 - a config this changes may be refused in any way
        return None


def miniature_agrees(model: TorchModel, shape: AttentionShape, context: Context) -> bool:
    """Whether fusing the miniature's export leaves its outputs as they were (module docstring)."""
    import onnx

    from compressor_frontends.pytorch.export import DEFAULT_OPSET
    from compressor_frontends.pytorch.kv_export import _export

    small = miniature(model.module)
    tables = rotary_tables(small) if small is not None else None
    if small is None or (tables is None and has_rotary(small)):
        return False
    with tempfile.TemporaryDirectory(prefix="fusion-check-", dir=context.workdir) as folder:
        target = Path(folder) / "miniature.onnx"
        try:
            _export(dataclasses.replace(model, module=small), target, int(context.options.get("opset") or DEFAULT_OPSET))
        except Exception:  # noqa: BLE001 - the miniature may not export where the model does
            return False
        plain = onnx.load(str(target))
    fused = copy.deepcopy(plain)
    if fuse_attention(fused, shape, *_tables_as(tables, fused)) != small.config.num_hidden_layers:
        return False
    try:
        return max_difference(plain, fused, shape) <= TOLERANCE
    except Exception:  # noqa: BLE001 - ONNX Runtime refusing the fused graph is a failed check
        return False


def max_difference(plain: Any, fused: Any, shape: AttentionShape) -> float:
    """The largest difference between two cache graphs' logits and cache entries at real
    positions: a left-padded batch of two (prefill of 7, 3 decode steps), and one row's
    prefill of 5, then 3 tokens at once, then one."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    sessions = [ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for graph in (plain, fused)]
    layers = sum(value.name.endswith(".key") for value in plain.graph.input)
    rng = np.random.default_rng(0)
    worst = 0.0
    for batch, steps in ((2, (7, 1, 1, 1)), (1, (5, 3, 1))):
        mask = np.zeros((batch, 0), np.int64)
        pasts: list[list[Any]] = [[np.zeros((batch, shape.kv_heads, 0, shape.head_dim), np.float32)] * (2 * layers)
                                  for _ in sessions]
        for count in steps:
            new_mask = np.ones((batch, count), np.int64)
            if batch > 1 and mask.shape[1] == 0:
                new_mask[1, :3] = 0  # left padding
            mask = np.concatenate([mask, new_mask], axis=1)
            feeds = {"input_ids": rng.integers(0, _MINI_VOCABULARY, (batch, count)), "attention_mask": mask,
                     "position_ids": np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -count:]}
            outputs = []
            for session, past in zip(sessions, pasts):
                names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
                outputs.append(session.run(None, {**feeds, **dict(zip(names, past))}))
            for index, (first, second) in enumerate(zip(*outputs)):
                real = mask[:, -count:] if index == 0 else mask
                axis_mask = real[:, :, None] if index == 0 else real[:, None, :, None]
                worst = max(worst, float(np.where(axis_mask != 0, np.abs(first - second), 0).max()))
            pasts = [output[1:] for output in outputs]
    return worst
