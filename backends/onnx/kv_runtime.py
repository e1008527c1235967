"""A causal LM graph with a key/value cache, as the onnx runtime presents it to core.

A graph with ``past_key_values.{i}.key/value`` inputs and ``present.{i}.key/value`` outputs
(compressor's generation-ready export, Optimum's, ONNX Runtime GenAI's layout) is described
by a :class:`~compressor.plugin.KVCacheLayout`, so that core measures it generating. For
core's one-pass measurement the runtime declares only the token inputs and the logits:
a call without past tensors is a prefill (past of length 0), the attention mask defaults to
ones and the position ids follow the mask.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from compressor.plugin import Examples, KVCacheLayout, TensorSpec, UsageError

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
#: Inputs the runtime fills when the caller leaves them out.
_DERIVED = ("attention_mask", "position_ids")


def cache_layout(inputs: tuple[TensorSpec, ...], outputs: tuple[str, ...], metadata: Mapping[str, str],
                 weight_bytes: int | None = None) -> KVCacheLayout | None:
    """The cache layout of a graph with these inputs and outputs, or None when it has no
    complete cache in this layout."""
    by_name = {spec.name: spec for spec in inputs}
    layers = {int(found.group(1)) for name in by_name if (found := _PAST.fullmatch(name))}
    if not layers or "input_ids" not in by_name or "logits" not in outputs or layers != set(range(len(layers))):
        return None
    keys = tuple(f"past_key_values.{i}.key" for i in range(len(layers)))
    values = tuple(f"past_key_values.{i}.value" for i in range(len(layers)))
    present_keys = tuple(f"present.{i}.key" for i in range(len(layers)))
    present_values = tuple(f"present.{i}.value" for i in range(len(layers)))
    if any(name not in by_name for name in values) or any(name not in outputs for name in (*present_keys,
                                                                                            *present_values)):
        return None
    shape = by_name[keys[0]].shape
    if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        return None
    limit = str(metadata.get(_max_positions_key(), ""))
    return KVCacheLayout(
        past_keys=keys, past_values=values, present_keys=present_keys, present_values=present_values,
        kv_heads=shape[1], head_dim=shape[3],
        attention_mask="attention_mask" if "attention_mask" in by_name else None,
        position_ids="position_ids" if "position_ids" in by_name else None,
        dtype=by_name[keys[0]].dtype,
        max_positions=int(limit) if limit.isdigit() else None,
        weight_bytes=weight_bytes,
    )


def graph_cache_layout(model: Any) -> KVCacheLayout | None:
    """The cache layout of an ONNX ModelProto (its graph alone is read), or None."""
    from compressor_onnx.shapes import graph_input_specs

    return cache_layout(graph_input_specs(model.graph), tuple(value.name for value in model.graph.output),
                        {entry.key: entry.value for entry in model.metadata_props})


def streamed_weight_bytes(path: Any) -> int | None:
    """The bytes of weights one decode step reads: every initializer but embedding tables that
    only Gather reads (one row per token). Read in a forked child, so that the graph's weights
    loaded to count them never add to the measuring process's peak memory."""
    from compressor.plugin import CompressorError, run_in_fork

    try:
        return run_in_fork(_streamed_weight_bytes, str(path), step="counting the weights a token reads")
    except CompressorError:
        return None


def _streamed_weight_bytes(path: str) -> int:
    import numpy as np
    import onnx
    from onnx import helper

    model = onnx.load(path, load_external_data=False)
    gathered, used = set(), set()
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            (gathered if node.op_type == "Gather" and index == 0 else used).add(name)
    total = 0
    for tensor in model.graph.initializer:
        if tensor.name in gathered and tensor.name not in used:
            continue
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return total


def _max_positions_key() -> str:
    from compressor_frontends.pytorch.kv_export import MAX_POSITIONS_KEY

    return MAX_POSITIONS_KEY


def cache_hidden(layout: KVCacheLayout, inputs: tuple[TensorSpec, ...],
                 outputs: tuple[TensorSpec, ...]) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The inputs and outputs core's one-pass measurement sees: the tokens (the mask optional)
    and the logits; not the cache, nor the positions (derived from the mask)."""
    hidden = {*layout.past_keys, *layout.past_values, *layout.present_keys, *layout.present_values,
              *(name for name in (layout.position_ids,) if name)}
    shown = tuple(dataclasses.replace(spec, optional=spec.optional or spec.name == layout.attention_mask)
                  for spec in inputs if spec.name not in hidden)
    return shown, tuple(spec for spec in outputs if spec.name not in hidden)


def complete_feeds(layout: KVCacheLayout, feeds: Mapping[str, Any]) -> dict[str, Any]:
    """``feeds`` with what the caller left out: an empty past (a prefill), a mask of ones,
    positions counted along the mask (so left padding keeps positions from 0)."""
    import numpy as np

    completed = dict(feeds)
    ids = np.asarray(completed[layout.input_ids])
    batch, count = ids.shape[0], ids.shape[-1]
    if layout.past_keys[0] not in completed:
        empty = np.zeros((batch, layout.kv_heads, 0, layout.head_dim), dtype=layout.dtype)
        completed.update({name: empty for name in (*layout.past_keys, *layout.past_values)})
    past_length = np.asarray(completed[layout.past_keys[0]]).shape[2]
    if layout.attention_mask and layout.attention_mask not in completed:
        completed[layout.attention_mask] = np.ones((batch, past_length + count), dtype=np.int64)
    if layout.position_ids and layout.position_ids not in completed:
        if layout.attention_mask:
            mask = np.asarray(completed[layout.attention_mask]).astype(np.int64)
            positions = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)[:, -count:]
        else:
            positions = np.broadcast_to(np.arange(past_length, past_length + count, dtype=np.int64), (batch, count))
        completed[layout.position_ids] = np.ascontiguousarray(positions)
    return completed


def add_cache_inputs(examples: Examples, layout: KVCacheLayout) -> None:
    """Complete data examples (token ids, perhaps a mask) into prefill feeds of a cache graph:
    an empty past per example, a mask of ones where the data has none, positions along the mask."""
    import numpy as np

    ids = examples.arrays[layout.input_ids]
    if examples.axes.get(layout.input_ids) != 0 or ids.ndim != 2:
        raise UsageError(f"the data's {layout.input_ids!r} must be [examples, tokens] to feed a language model")
    rows = ids.shape[0]
    if layout.attention_mask and layout.attention_mask not in examples.arrays:
        examples.arrays[layout.attention_mask] = np.ones(ids.shape, dtype=np.int64)
        examples.axes[layout.attention_mask] = 0
    empty = np.zeros((rows, layout.kv_heads, 0, layout.head_dim), dtype=layout.dtype)
    for name in (*layout.past_keys, *layout.past_values):
        examples.arrays[name], examples.axes[name] = empty, 0
    if layout.position_ids:
        if layout.attention_mask:
            mask = np.asarray(examples.arrays[layout.attention_mask]).astype(np.int64)
            positions = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)
        else:
            positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        examples.arrays[layout.position_ids], examples.axes[layout.position_ids] = positions, 0
