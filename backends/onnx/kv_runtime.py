"""A causal LM graph with a key/value cache, as the onnx runtime presents it to core.

A graph with ``past_key_values.{i}.key/value`` inputs and ``present.{i}.key/value`` outputs
(compressor's generation-ready export, Optimum's, ONNX Runtime GenAI's layout) is described
by a :class:`~compressor.plugin.KVCacheLayout`, so that core measures it generating. For
core's one-pass measurement the runtime declares only the token inputs and the logits:
a call without past tensors is a prefill (past of length 0), the attention mask defaults to
ones and the position ids follow the mask. :class:`CacheBinding` runs the graph with I/O
binding, so that decoding copies no cache out of ONNX Runtime.
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


#: Inputs that read one row per token or position, by op type: an embedding table (plain,
#: or int4 with its scales and zero points) and the fused attention's rotary cos/sin tables.
_ROW_READ_INPUTS = {"Gather": (0,), "GatherBlockQuantized": (0, 1, 2), "RotaryEmbedding": (2, 3),
                    "GroupQueryAttention": (7, 8)}


def streamed_weight_bytes(path: Any) -> int | None:
    """The bytes of weights one decode step reads: every initializer but the tables only read
    a row at a time (``_ROW_READ_INPUTS``: embeddings, rotary tables). Read in a forked child,
    so that the graph's weights loaded to count them never add to the measuring process's
    peak memory."""
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
        rows = _ROW_READ_INPUTS.get(node.op_type, ())
        for index, name in enumerate(node.input):
            (gathered if index in rows else used).add(name)
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


class CacheBinding:
    """Runs a cache graph with ONNX Runtime's I/O binding: the logits and the present are
    written by the graph straight into NumPy arrays allocated here (``session.run`` would copy
    each out of ONNX Runtime's buffers), and the past is bound where it lies, so that a decode
    step moves no cache bytes besides the graph's own. The shapes come from the inputs'
    (``[batch, sequence, vocabulary]`` logits, ``[batch, kv_heads, past + sequence,
    head_dim]`` present); a graph whose logits' width is not fixed runs unbound.

    A graph whose attention is ONNX Runtime's ``GroupQueryAttention`` (compressor's fused
    export: :data:`compressor_onnx.kv_fusion.FUSED_KEY`) does not even copy the past into the
    present: at batch 1, when a call's past is the present the call before returned (the same
    arrays), the cache is moved once into buffers with room to grow, bound as both past and
    present, and the attention writes the new positions in place; the present is returned as
    views of the buffers -- as ONNX Runtime GenAI runs the builder's graphs
    (``past_present_share_buffer``). Otherwise a step copies the cache, 2 x layers x heads x
    length x head size values, each token. Only positions past every view returned are
    written, so a view a caller kept never changes; a prompt alone (a latency call) is run
    as usual."""

    def __init__(self, session: Any, layout: KVCacheLayout, output_names: list[str]) -> None:
        import numpy as np

        from compressor_onnx.kv_fusion import FUSED_KEY

        self.session, self.layout, self.output_names = session, layout, output_names
        shapes = {node.name: node.shape for node in session.get_outputs()}
        width = (shapes.get(layout.logits) or [None])[-1]
        present = {*layout.present_keys, *layout.present_values}
        known = set(output_names) == present | {layout.logits}
        self.vocabulary = int(width) if known and isinstance(width, int) else None
        types = {node.name: node.type for node in session.get_outputs()}
        self.dtypes = {name: np.dtype(_numpy_dtype(types[name])) for name in output_names}
        self.binding = session.io_binding() if self.vocabulary else None
        self.shared = self.binding is not None and FUSED_KEY in session.get_modelmeta().custom_metadata_map
        #: Past input -> present output, and the cache buffers and views of the last shared call.
        self.pairs = dict(zip((*layout.past_keys, *layout.past_values), (*layout.present_keys, *layout.present_values)))
        self.buffers: dict[str, Any] = {}
        self.views: dict[str, Any] = {}
        self.bound_buffers: dict[str, Any] | None = None  # the buffers the binding holds, kept between steps

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """The outputs of one call on completed feeds (:func:`complete_feeds`)."""
        if self.binding is not None:
            try:
                shared = self._run_shared(feeds) if self.shared else None
                return shared if shared is not None else self._run_bound(feeds)
            except Exception:  # noqa: BLE001 - outputs not of the shapes foreseen: run unbound from now on
                self.binding = None
        import numpy as np

        # (A past may be a view of the buffers: a strided array.)
        contiguous = {name: np.ascontiguousarray(value) for name, value in feeds.items()}
        return dict(zip(self.output_names, self.session.run(self.output_names, contiguous)))

    def _run_shared(self, feeds: Mapping[str, Any]) -> dict[str, Any] | None:
        """A batch-1 call in the cache buffers (class docstring), or None where it cannot be."""
        import numpy as np

        layout = self.layout
        batch, count = np.shape(feeds[layout.input_ids])[0], np.shape(feeds[layout.input_ids])[-1]
        length = np.shape(feeds[layout.past_keys[0]])[2]
        if batch != 1:
            return None
        if length == 0:  # a prompt: run as usual; its present goes into buffers if a step follows
            outputs = self._run_bound(feeds)
            self.buffers, self.views = {}, {name: outputs[present] for name, present in self.pairs.items()}
            return outputs
        if not self.views or any(feeds[name] is not view for name, view in self.views.items()):
            return None
        total = length + count
        if not self.buffers or total > next(iter(self.buffers.values())).shape[2]:
            self.buffers = {name: self._buffer(self.views[name], total) for name in self.pairs}
        binding = self.binding
        if self.bound_buffers is not self.buffers:  # else bound by the step before: only the tokens change
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            for name, present in self.pairs.items():
                buffer = self.buffers[name]
                binding.bind_input(name, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)
                binding.bind_output(present, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)
            self.bound_buffers = self.buffers
        for name, value in feeds.items():
            if name not in self.pairs:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))  # replaces the step before's
        logits = np.empty((batch, count, self.vocabulary), dtype=self.dtypes[layout.logits])
        binding.bind_output(layout.logits, "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        return self._viewed({layout.logits: logits}, total)

    def _buffer(self, cache: Any, needed: int) -> Any:
        """A buffer holding ``cache`` with room for ``needed`` positions and as many again (the
        graph's context length at most); the pages past what is written are never touched."""
        import numpy as np

        limit = self.layout.max_positions
        capacity = max(2 * needed, needed + 64)
        capacity = max(min(capacity, limit), needed) if limit else capacity
        shape = list(np.shape(cache))
        buffer = np.empty((*shape[:2], capacity, shape[3]), dtype=np.asarray(cache).dtype)
        buffer[:, :, :shape[2]] = cache
        return buffer

    def _viewed(self, outputs: dict[str, Any], total: int) -> dict[str, Any]:
        """``outputs`` with the present: the buffers' first ``total`` positions, as views."""
        self.views = {name: buffer[:, :, :total] for name, buffer in self.buffers.items()}
        outputs.update({self.pairs[name]: view for name, view in self.views.items()})
        return outputs

    def _run_bound(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        import numpy as np

        layout, binding = self.layout, self.binding
        batch, count = np.shape(feeds[layout.input_ids])[0], np.shape(feeds[layout.input_ids])[-1]
        total = np.shape(feeds[layout.past_keys[0]])[2] + count
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        self.bound_buffers = None
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))  # the binding holds it
        outputs = {}
        for name in self.output_names:
            shape = ((batch, count, self.vocabulary) if name == layout.logits
                     else (batch, layout.kv_heads, total, layout.head_dim))
            outputs[name] = np.empty(shape, dtype=self.dtypes[name])
            binding.bind_output(name, "cpu", 0, self.dtypes[name], list(shape), outputs[name].ctypes.data)
        self.session.run_with_iobinding(binding)
        return outputs


def _numpy_dtype(onnx_type: str) -> str:
    name = onnx_type.removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64"}.get(name, name)
