"""Fused attention applied to a generation-ready export, and checked before it is kept.

:func:`fuse_export` runs :func:`compressor_onnx.kv_fusion.fuse_attention` on the export of
a transformers causal LM (rotary positions, or none: GPT-2). It first proves the pass on a miniature of
the same architecture (the model's config with two layers, a small vocabulary and MLP, random
weights, its vectors -- norm weights, biases -- random too, so that a misread one shows):
exported unfused and fused, both run in ONNX Runtime on a left-padded batch of two
(prefill, then decode steps) and on a one-row chunked prefill, and the logits and cache
entries of every real (unpadded) position must agree within 1e-4. Only then is the real
graph rewritten, so the check costs a few seconds and no copy of the real weights. A model
the pass does not recognize, a rotary embedding that depends on the sequence length (dynamic
NTK, LongRoPE), or a failed check leave the export as it was.

With the attention, the same check covers the rewrites that follow it (:func:`fuse_graph`):
residual add + RMSNorm as ``SkipSimplifiedLayerNormalization``
(:mod:`compressor_onnx.kv_fusion_norms`), each layer's query, key and value projections as
one MatMul (:mod:`compressor_onnx.kv_fusion_qkv`) and, for a model whose mask is causal and
padding alone, the attention bias built from the attention mask in six nodes
(:mod:`compressor_onnx.kv_fusion_mask`). Where the miniature disagrees with them but not with
the attention alone, the attention alone is fused.

Limit of the fused graph (ONNX Runtime's ``GroupQueryAttention``): a step that appends more
than one token to a non-empty cache must be at batch 1 (prefill at any batch, decode at any
batch, chunked prefill at batch 1); compressor's generation never does otherwise.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.plugin import Context
from compressor_frontends.pytorch import TorchModel
from compressor_onnx.kv_fusion import AttentionShape, fuse_attention, recognizes
from compressor_onnx.kv_fusion_mask import padding_bias
from compressor_onnx.kv_fusion_norms import fuse_norms
from compressor_onnx.kv_fusion_qkv import pack_projections

#: Agreement required between the miniature's unfused and fused graphs (absolute, fp32).
TOLERANCE = 1e-4
_MINI_LAYERS, _MINI_VOCABULARY, _MINI_MLP = 2, 128, 32
#: Graph metadata: residual add + RMSNorms fused, layers whose QKV projections were packed, and
#: "1" where the attention bias is the padding alone.
NORMS_KEY, PACKED_KEY, PADDING_KEY = "compressor.fused_norms", "compressor.packed_qkv", "compressor.padding_bias"


@dataclass(frozen=True)
class Fusions:
    """What :func:`fuse_graph` rewrote."""

    layers: int
    norms: int = 0
    packed: int = 0
    padding_bias: bool = False


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
    everything = miniature_agrees(model, shape, context) if recognizes(proto) else None
    if everything is None:
        return 0
    fused = fuse_graph(proto, shape, *_tables_as(tables, proto), everything=everything,
                       padding_only=padding_only_mask(module), folder=path.parent if graph is None else None).layers
    if fused and graph is None:
        onnx.save_model(proto, str(path))  # the graph alone: its external data stays as written
    return fused


def fuse_graph(graph: Any, shape: AttentionShape, cos_table: Any | None, sin_table: Any | None,
               everything: bool = True, padding_only: bool = False, folder: Path | None = None) -> Fusions:
    """Fuse ``graph``'s attention (changed in place) and, with ``everything``, its norms and
    projections after it, and (``padding_only``: a mask that is causal and padding alone) its
    attention bias (none where the attention is not fused). ``folder``: where the external
    data of a graph on disk is."""
    from onnx import helper

    fusions = Fusions(fuse_attention(graph, shape, cos_table, sin_table))
    if not fusions.layers or not everything:
        return fusions
    fusions = dataclasses.replace(fusions, norms=fuse_norms(graph), packed=pack_projections(graph, folder),
                                  padding_bias=padding_only and padding_bias(graph))
    counts = {NORMS_KEY: fusions.norms, PACKED_KEY: fusions.packed, PADDING_KEY: int(fusions.padding_bias)}
    helper.set_model_props(graph, {**{p.key: p.value for p in graph.metadata_props},
                                   **{key: str(count) for key, count in counts.items() if count}})
    return fusions


def padding_only_mask(module: Any) -> bool:
    """Whether the model masks attention by causality and padding alone: no sliding window
    (Mistral's; Qwen2's where ``use_sliding_window``), chunked attention or per-layer kinds."""
    config = getattr(module, "config", None)
    if config is None:
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    kinds = getattr(config, "layer_types", None) or ()
    return not getattr(config, "attention_chunk_size", None) and all(kind == "full_attention" for kind in kinds)


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
        small = type(module)(config).eval()
    except Exception:  # noqa: BLE001 - a config this changes may be refused in any way
        return None
    with torch.no_grad():  # initialized to ones and zeros: a norm weight or bias misread would not show
        for parameter in small.parameters():
            if parameter.ndim == 1:
                parameter.uniform_(0.5, 1.5)
    return small


def miniature_agrees(model: TorchModel, shape: AttentionShape, context: Context) -> bool | None:
    """Whether fusing the miniature's export leaves its outputs as they were (module docstring):
    True where every rewrite does, False where the attention alone does, None where not even it."""
    import onnx

    from compressor_frontends.pytorch.export import DEFAULT_OPSET
    from compressor_frontends.pytorch.kv_export import _export

    small = miniature(model.module)
    tables = rotary_tables(small) if small is not None else None
    if small is None or (tables is None and has_rotary(small)):
        return None
    with tempfile.TemporaryDirectory(prefix="fusion-check-", dir=context.workdir) as folder:
        target = Path(folder) / "miniature.onnx"
        try:
            _export(dataclasses.replace(model, module=small), target, int(context.options.get("opset") or DEFAULT_OPSET))
        except Exception:  # noqa: BLE001 - the miniature may not export where the model does
            return None
        plain = onnx.load(str(target))
    for everything in (True, False):
        fused = copy.deepcopy(plain)
        if fuse_graph(fused, shape, *_tables_as(tables, fused), everything=everything,
                      padding_only=padding_only_mask(small)).layers != small.config.num_hidden_layers:
            return None
        try:
            if max_difference(plain, fused, shape) <= TOLERANCE:
                return everything
        except Exception:  # noqa: BLE001 - ONNX Runtime refusing the fused graph is a failed check
            pass
    return None


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
