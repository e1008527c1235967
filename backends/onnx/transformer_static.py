"""Static int8 for transformer graphs: the way NNCF and ONNX Runtime's transformer tools do it.

Measured on all-MiniLM-L6-v2 (benchmarks/bench_onnx_quantization.py): ONNX
Runtime's ``quantize_static`` over every weighted op gave 0.946 sentence cosine
and was slower than fp32 with int8 activations. What this path does, and why:

1. ``quant_pre_process`` (symbolic shape inference, ORT's basic optimizations).
2. Only ``MatMul``/``Gemm`` whose second input is a constant weight are
   quantized, weights per output channel. Attention's activation x activation
   MatMuls, LayerNormalization, Softmax, GELU, residual Adds and the output
   projection (a weighted MatMul/Gemm feeding a graph output, e.g. the pooler
   or the LM head) stay float; the report lists them with the reason.
3. The MatMul outputs are not quantized (``OpTypesToExcludeOutputQuantization``):
   quantizing them before the bias and residual Adds cost 0.047 cosine; without
   it ONNX Runtime fuses each into ``MatMulIntegerToFloat``.
4. SmoothQuant (``alpha``, 0 = off): per-input-channel scales move activation
   outliers (BERT's LayerNorm and GELU outputs reach 15x the median channel)
   into the weights, a ``Mul`` before each group of MatMuls sharing an input.
   ONNX Runtime's own ``SmoothQuant`` option needs neural-compressor 2.x's ONNX
   adaptor, which current neural-compressor no longer has, so it is done here.
5. Activations are uint8 on x86: ONNX Runtime only fuses uint8 QDQ activations
   there (``QDQIsInt8Allowed`` is false off ARM); int8 activations left the
   DequantizeLinear nodes in place and ran slower than fp32.
6. Embeddings (``Gather`` on a float matrix) are weight-only uint8, as
   ``quantize dynamic`` stores them (Gather on uint8, then DequantizeLinear).
7. Memory: the activation ranges are folded in batch by batch (transformer_ranges.py:
   the same ranges, so the same model bytes, as ONNX Runtime's calibrators),
   ``quant_pre_process`` runs in a child process of its own, and every later step reads
   skeletons of external-data files. On MiniLM the quantizing process peaked at 1.72 GB
   (5.8 GB with percentile or entropy calibration) and now at 0.90-0.92 GB
   (benchmarks/bench_int8_memory.py).
"""

from __future__ import annotations

import platform
from collections import Counter
from pathlib import Path
from typing import Any

from compressor.plugin import CompressionError, Context, Step, first_line
from compressor_onnx.external import Producer, load_skeleton, read_array, write_model

NORMALIZATIONS = frozenset({"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
                            "SkipSimplifiedLayerNormalization"})
FUSED_ATTENTION = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention"})
#: Ops between an output projection and the graph output it feeds.
_TO_OUTPUT = frozenset({"Add", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast",
                        "Tanh", "Softmax", "Sigmoid"})
#: Ops that stay float by design, counted in the report.
KEPT_FLOAT = {"LayerNormalization": "normalization", "Softmax": "softmax", "Erf": "GELU", "Gelu": "GELU",
               "FastGelu": "GELU", "Tanh": "activation", "Add": "bias and residual Adds"}
DEFAULT_ALPHA = 0.8


def is_transformer(model: Any) -> bool:
    """A layer normalization and attention (Softmax over an activation x activation MatMul)."""
    ops = Counter(node.op_type for node in model.graph.node)
    initializers = {tensor.name for tensor in model.graph.initializer}
    norm = bool(NORMALIZATIONS & set(ops)) or ("ReduceMean" in ops and ("Sqrt" in ops or "Pow" in ops))
    attention = bool(FUSED_ATTENTION & set(ops)) or ("Softmax" in ops and any(
        node.op_type == "MatMul" and not set(node.input) & initializers for node in model.graph.node))
    return norm and attention


def activation_type(mode: str) -> str:
    arm = platform.machine().lower() in ("arm64", "aarch64")
    return "int8" if mode == "int8" and arm else "uint8"


def quantize_transformer_file(
    source: Path, target: Path, step: Step, excluded: list[str], context: Context, reduce_range: bool
) -> tuple[list[str], dict[str, Any]]:
    """Quantize the model at ``source`` into ``target`` (one ``.data`` file when large); notes and metadata."""
    from compressor_onnx.quantize_common import is_large_file, op_types

    large = is_large_file(source)
    folder = target.parent
    notes: list[str] = []
    pre = folder / "pre.onnx"
    if not _pre_process(source, pre, step):
        pre = source
        notes.append("quant_pre_process failed on this graph; quantized without it")
    model = load_skeleton(pre)
    allowed = set(op_types(("MatMul", "Gemm", "Gather"), step))
    targets, reasons = plan_targets(model, set(excluded), allowed)
    alpha = float(step.params.get("alpha", DEFAULT_ALPHA))
    smoothed = folder / "smoothed.onnx"
    if alpha > 0 and targets:
        producers = smooth(model, pre, targets, alpha, context, int(step.params.get("calibration_samples", 128)))
        write_model(model, smoothed, pre.parent, producers)
    else:
        smoothed = pre
    quantized = folder / "static.onnx"
    activations = activation_type(step.mode)
    _quantize_static(smoothed, quantized, step, [node.name for node in targets], activations, reduce_range,
                     context, large)
    skeleton = load_skeleton(quantized)
    embeddings = _embeddings(skeleton, quantized.parent, excluded, allowed, reduce_range)
    del skeleton.graph.value_info[:]
    write_model(skeleton, target, quantized.parent, embeddings)
    metadata = static_metadata(model, targets, reasons, embeddings, alpha, activations, "transformer")
    notes.append(
        f"transformer static {step.mode}: {len(targets)} MatMul/Gemm with constant weights quantized "
        f"per-channel, {activations} activations, SmoothQuant alpha={alpha:g}, embeddings weight-only uint8; "
        + "; ".join(f"{len(names)} {reason}" for reason, names in reasons.items() if names and reason != "stay float by design")
        + " kept float (float_node_reasons)"
    )
    return notes, metadata


def _pre_process(source: Path, target: Path, step: Step) -> bool:
    """``quant_pre_process`` from ``source`` to ``target`` (external data), in a forked child:
    its symbolic shape inference and optimizer session leave ~400 MB allocated after they
    return on all-MiniLM-L6-v2 (90 MB), which would stay in this process for the steps
    that follow; a child gives it all back. False when it failed (or crashed)."""
    from compressor.plugin import run_in_fork

    try:
        return run_in_fork(_pre_process_here, source, target, step=f"quantize {step.mode}")
    except CompressionError:  # a native crash in shape inference: quantize without it
        return False


def _pre_process_here(source: Path, target: Path) -> bool:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from compressor_onnx.quantize_common import quiet_ort

    # External data whatever the size: later steps load skeletons of it, not its weights.
    options: dict[str, Any] = {"auto_merge": True, "save_as_external_data": True, "all_tensors_to_one_file": True,
                               "external_data_location": f"{target.name}.data"}
    for attempt in ({}, {"skip_symbolic_shape": True}):
        try:
            with quiet_ort():
                quant_pre_process(str(source), str(target), **options, **attempt)
            return True
        except Exception:  # noqa: BLE001,S112 - shape inference raises anything; try without it
            continue
    return False


def plan_targets(model: Any, excluded: set[str], allowed: set[str]) -> tuple[list[Any], dict[str, list[str]]]:
    """The MatMul/Gemm nodes to quantize, and the weighted-op nodes kept float by reason."""
    from onnx import TensorProto

    floats = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2}
    initializers = {t.name for t in model.graph.initializer}
    outputs = _output_projections(model)
    targets: list[Any] = []
    reasons: dict[str, list[str]] = {"activation x activation MatMul (attention)": [], "output projection": [],
                                     "excluded by parameters": [], "unnamed (ONNX Runtime selects nodes by name)": []}
    for index, node in enumerate(model.graph.node):
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or f"{node.op_type}#{index}"
        if not set(node.input[:2]) & initializers:
            reasons["activation x activation MatMul (attention)"].append(name)
        elif len(node.input) < 2 or node.input[1] not in floats or _transposes_a(node):
            continue
        elif node.name in excluded or node.op_type not in allowed:
            reasons["excluded by parameters"].append(name)
        elif node.output[0] in outputs:
            reasons["output projection"].append(name)
        elif not node.name:
            reasons["unnamed (ONNX Runtime selects nodes by name)"].append(name)
        else:
            targets.append(node)
    return targets, reasons


def _transposes_a(node: Any) -> bool:
    from onnx import helper

    return node.op_type == "Gemm" and any(a.name == "transA" and helper.get_attribute_value(a) for a in node.attribute)


def _output_projections(model: Any) -> set[str]:
    """Tensors from which a graph output is reached through bias Adds, reshapes and output activations only."""
    producers = {output: node for node in model.graph.node for output in node.output}
    reached, frontier = set(), [output.name for output in model.graph.output]
    while frontier:
        name = frontier.pop()
        if name in reached:
            continue
        reached.add(name)
        node = producers.get(name)
        if node is not None and node.op_type in _TO_OUTPUT:
            frontier.extend(node.input)
    return reached


def smooth(model: Any, path: Path, targets: list[Any], alpha: float, context: Context, samples: int) -> dict[str, Producer]:
    """SmoothQuant on ``model`` (the skeleton of ``path``, edited in place): scaled
    weights (as producers) and a ``Mul`` by 1/s before each group of targets sharing an input."""
    import numpy as np
    from onnx import helper, numpy_helper

    groups: dict[str, list[Any]] = {}
    for node in targets:
        groups.setdefault(node.input[0], []).append(node)
    maxima = _activation_maxima(model, path, list(groups), context, samples)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    producers: dict[str, Producer] = {}
    muls: dict[str, Any] = {}
    for name, nodes in groups.items():
        weights = [(node, read_array(initializers[node.input[1]], path.parent), _input_axis(node)) for node in nodes]
        weight_max = np.max([np.abs(w).max(axis=1 - axis) for _, w, axis in weights], axis=0)
        scales = (np.power(maxima[name], alpha) / np.power(np.maximum(weight_max, 1e-8), 1 - alpha))
        scales = np.clip(scales, 1e-5, None).astype(np.float32)
        for node, _, axis in weights:
            new_name = node.input[1] + "_smoothed"
            if new_name not in initializers:
                tensor = model.graph.initializer.add()
                tensor.name = new_name
                initializers[new_name] = tensor
                reference = initializers[node.input[1]]
                producers[new_name] = _scaled(reference, path.parent, scales, axis)
            node.input[1] = new_name
        inverse = numpy_helper.from_array((1.0 / scales).astype(np.float32), name + "_smooth_scale")
        model.graph.initializer.append(inverse)
        muls[name] = helper.make_node("Mul", [name, inverse.name], [name + "_smoothed"], name + "_SmoothQuantMul")
        for node in nodes:
            node.input[0] = name + "_smoothed"
    ordered: list[Any] = []
    for node in model.graph.node:
        for name in node.input:
            if name.endswith("_smoothed") and name[: -len("_smoothed")] in muls:
                ordered.append(muls.pop(name[: -len("_smoothed")]))
        ordered.append(node)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    from compressor_onnx.int8_stream import _drop_unused_initializers

    _drop_unused_initializers(model.graph)
    return {name: producer for name, producer in producers.items() if name in {t.name for t in model.graph.initializer}}


def _input_axis(node: Any) -> int:
    """The weight axis that meets the activation's channels: 0 for MatMul, 1 for Gemm with transB."""
    from onnx import helper

    transposed = node.op_type == "Gemm" and any(
        a.name == "transB" and helper.get_attribute_value(a) for a in node.attribute)
    return 1 if transposed else 0


def _scaled(reference: Any, folder: Path, scales: Any, axis: int) -> Producer:
    kept = type(reference)()
    kept.CopyFrom(reference)
    shape = (-1, 1) if axis == 0 else (1, -1)
    return lambda: read_array(kept, folder) * scales.reshape(shape)


def _activation_maxima(model: Any, path: Path, names: list[str], context: Context, samples: int) -> dict[str, Any]:
    """Per-channel (last axis) maximum |x| of each named tensor over the calibration examples."""
    import numpy as np

    from compressor_onnx.transformer_ranges import probed_outputs

    batches = _calibration_batches(model, context, samples)
    maxima: dict[str, Any] = {}
    try:
        for outputs in probed_outputs(model, path, names, batches, optimize=True):
            for name, value in outputs.items():
                rows = value.reshape(-1, value.shape[-1])
                # max(max x, -min x) is max |x| exactly, without an |x| copy of every batch
                channel_max = np.maximum(rows.max(axis=0), -rows.min(axis=0))
                maxima[name] = np.maximum(maxima.get(name, 0), channel_max)
    except Exception as error:  # noqa: BLE001 - ONNX Runtime raises its own types
        raise CompressionError(f"SmoothQuant calibration failed ({first_line(error)})") from None
    return maxima


def _calibration_batches(skeleton: Any, context: Context, samples: int) -> list[dict[str, Any]]:
    from compressor_onnx.static_calibration import calibration_feeds

    assert context.calibration_data is not None, "static modes need calibration data (checked by core)"
    return calibration_feeds(skeleton, context.calibration_data, samples, context.options).batches()


def _quantize_static(source: Path, target: Path, step: Step, nodes: list[str], activations: str,
                     reduce_range: bool, context: Context, large: bool) -> None:
    """ONNX Runtime's ``quantize_static`` of ``nodes`` from ranges calibrated here
    (transformer_ranges.py: the same ranges as its own calibrators, a fraction of the memory)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    from compressor_onnx.quantize_common import calibration_method, quiet_ort
    from compressor_onnx.transformer_ranges import calibrated_ranges

    method = str(step.params.get("calibration_method", "minmax"))
    cache = target.with_name("ranges.json")
    skeleton = load_skeleton(source)
    chosen = set(nodes)
    activations_read = list(dict.fromkeys(node.input[0] for node in skeleton.graph.node if node.name in chosen))
    batches = _calibration_batches(skeleton, context, int(step.params.get("calibration_samples", 128)))
    try:
        with quiet_ort():
            save_tensors_data(calibrated_ranges(skeleton, source, activations_read, batches, method), cache)
        del skeleton, batches
        with quiet_ort():
            quantize_static(
                source, target, None, quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8, per_channel=bool(step.params.get("per_channel", True)),
                reduce_range=reduce_range, calibrate_method=calibration_method(method),
                op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=nodes,
                use_external_data_format=large, calibration_cache_path=str(cache),
                extra_options={"MatMulConstBOnly": True, "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]},
            )
    except Exception as error:  # noqa: BLE001 - the quantizer raises anything on odd graphs
        from compressor_onnx.quantize_failures import keep_for_debugging, kept_suffix, shown_reason

        kept = keep_for_debugging([target], "failed-int8")
        raise CompressionError(
            f"static {step.mode} quantization failed ({shown_reason(error)}){kept_suffix(kept)}") from None
    finally:
        cache.unlink(missing_ok=True)


def _embeddings(skeleton: Any, folder: Path, excluded: list[str], allowed: set[str], reduce_range: bool) -> dict[str, Producer]:
    """Gather on float matrices as uint8 + DequantizeLinear, the dynamic path's own rewrite."""
    if "Gather" not in allowed:
        return {}
    from compressor_onnx.int8_stream import quantize_dynamic_int8

    return quantize_dynamic_int8(skeleton, folder, False, excluded, ["Gather"], convert_gemm=False,
                                 reduce_range=reduce_range)


def static_metadata(model: Any, targets: list[Any], reasons: dict[str, list[str]], embeddings: dict[str, Any],
                    alpha: float, activations: str, path: str) -> dict[str, Any]:
    """What the report says of a transformer's static quantization (``reasons`` gains the
    ops kept float by design)."""
    kept = Counter(KEPT_FLOAT[node.op_type] for node in model.graph.node if node.op_type in KEPT_FLOAT)
    reasons["stay float by design"] = [f"{count} {what}" for what, count in sorted(kept.items())]
    return {
        "static_path": path,
        "activation_type": activations,
        "smooth_quant_alpha": alpha,
        "quantized_matmuls": len(targets),
        "quantized_embeddings": len({name[: -len("_quantized")] for name in embeddings if name.endswith("_quantized")}),
        "float_node_reasons": {reason: names for reason, names in reasons.items() if names},
    }
