"""ONNX Runtime quantization: dynamic int8, static QDQ int8/uint8 (transformer
graphs: transformer_static.py; other graphs: a configuration chosen by measured
fidelity, int8_choice.py), weight-only int4 (int4.py) and fp16.

This module dispatches ``quantize MODE`` on a Network: in memory here, past the
large-model threshold through large.py; int8 goes through ONNX Runtime in a forked child
(int8_file.py): static from file to file, dynamic from the in-memory graph.
What the modes share is in quantize_common.py.

Defaults were chosen by measured accuracy (benchmarks/bench_onnx_minilm.py):
per-channel weights keep all-MiniLM-L6-v2's sentence embeddings at ~0.994
cosine to float32, where ONNX Runtime's own per-tensor default gives ~0.96.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compressor.plugin import Context, Step, UsageError
from compressor_frontends.pytorch.export import large_model_bytes, strip_value_info
from compressor_frontends.pytorch.onnx_graph import WEIGHTED_OPS
from compressor_onnx.int4_settings import for_model, mode_facts
from compressor_onnx.quantize_common import parse_names, to_fp16


def check_quantize_step(step: Step, context: Context) -> None:
    """Refuse parameters core's declaration cannot check, before any work (export included)."""
    from compressor_onnx.int4 import check_int4

    check_int4(step, context)


def quantize_network(network: Any, step: Step, context: Context) -> tuple[Any, list[str], dict[str, Any]]:
    """``quantize MODE`` on a Network (in memory or on disk): the new Network, notes and metadata."""
    import dataclasses
    import tempfile

    if network.path is not None:
        from compressor_onnx.large import quantize_large

        path, notes, metadata = quantize_large(network.path, step, context)
        return dataclasses.replace(network, path=path), notes, metadata
    with tempfile.TemporaryDirectory(prefix="quantize-", dir=context.workdir) as folder:
        graph, notes, metadata = quantize_graph(network.graph, step, context, Path(folder))
    return dataclasses.replace(network, graph=graph), notes, metadata


def quantize_graph(graph: Any, step: Step, context: Context, workdir: Path) -> tuple[Any, list[str], dict[str, Any]]:
    """Apply ``quantize MODE`` to ``graph`` (which stays as it is): the new graph, notes and metadata."""
    import onnx

    from compressor_frontends.pytorch.onnx_graph import constants_to_initializers
    from compressor_onnx.preprocess import shrink_facts, weight_bytes

    step = for_model(step, graph)
    original, graph = graph, onnx.ModelProto()
    graph.CopyFrom(original)
    moved = constants_to_initializers(graph)
    before = weight_bytes(graph)
    notes: list[str] = []
    metadata: dict[str, Any] = {}
    if step.mode == "fp16":
        result = to_fp16(graph)
    else:
        excluded_nodes = parse_names(step.params.get("exclude_nodes"))
        unknown = sorted(set(excluded_nodes) - {node.name for node in graph.graph.node})
        if unknown:
            raise UsageError(f"exclude_nodes names nodes the graph does not have: {', '.join(unknown)}")
        if step.mode == "int4":
            from compressor_onnx.int4 import quantize_int4_graph

            result, notes = quantize_int4_graph(strip_value_info(graph), step, context)
            result = strip_value_info(result)
        elif step.mode == "dynamic":
            from compressor_onnx.int8_file import quantize_dynamic_graph

            # The graph itself, not a file of it: ONNX Runtime writes its own copies (see there).
            target = workdir / "quantize-out.onnx"
            metadata = quantize_dynamic_graph(strip_value_info(graph), target, step, excluded_nodes)
            result = strip_value_info(_inline(onnx.load(str(target))))
        else:
            from compressor_onnx.int8_file import quantize_int8_file

            source, target = workdir / "quantize-in.onnx", workdir / "quantize-out.onnx"
            _save_for_quantizer(strip_value_info(graph), source)
            notes, metadata = quantize_int8_file(source, target, step, excluded_nodes, context, graph)
            result = strip_value_info(onnx.load(str(target)))
    shrink_notes, shrink_metadata = shrink_facts(before, weight_bytes(result), moved, step.mode)
    return result, [*notes, *shrink_notes], {**metadata, **shrink_metadata, **mode_facts(step)}


def float_nodes(graph: Any) -> list[str]:
    """Weighted nodes that read a floating-point initializer directly: they stayed float."""
    from onnx import TensorProto

    floating = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    float_weights = {t.name for t in graph.graph.initializer if t.data_type in floating}
    return [
        node.name or f"{node.op_type}#{index}"
        for index, node in enumerate(graph.graph.node)
        if node.op_type in WEIGHTED_OPS and any(name in float_weights for name in node.input)
    ]


def _save_for_quantizer(graph: Any, path: Path) -> None:
    """Save ``graph`` where ONNX Runtime's quantizer reads it (external data past 2 GB)."""
    import onnx

    if graph.ByteSize() > large_model_bytes():
        onnx.save_model(graph, str(path), save_as_external_data=True, location=f"{path.name}.data")
    else:
        onnx.save_model(graph, str(path))


def _inline(graph: Any) -> Any:
    """``graph`` as if it had been saved without external data: onnx's loader marks each tensor
    it read from a data file ``data_location=DEFAULT``, a field an inline tensor leaves unset."""
    from onnx import TensorProto

    from compressor_onnx.safety import all_tensors

    for tensor in all_tensors(graph):
        if tensor.HasField("data_location") and tensor.data_location == TensorProto.DEFAULT:
            tensor.ClearField("data_location")
    return graph
