"""Graph clean-ups every quantize mode runs first, and the facts it reports.

* Weights held by ``Constant`` nodes (exports from Paddle, TensorFlow and other
  frameworks) become initializers
  (:func:`compressor_frontends.pytorch.onnx_graph.constants_to_initializers`): ONNX
  Runtime's quantizers only quantize initializers, and refused such graphs ("Expected
  conv2d_157.w_0 to be an initializer") or left their weights float at the same size.
* ``weight_bytes`` sums the initializers by type, so a step can say when its
  weights did not shrink.

Both work on in-memory graphs and on skeletons (graphs loaded without their
external data): a converted tensor keeps its external-data reference, so the
writer copies its bytes like any other initializer's.
"""

from __future__ import annotations

from typing import Any

from compressor_frontends.pytorch.onnx_graph import CONSTANT_WEIGHT_TYPES

#: A step whose float weights end at least this share of what they were did not shrink them.
NOT_SHRUNK = 0.95


def weight_bytes(model: Any) -> dict[str, int]:
    """Bytes of the main graph's initializers: ``{"float": ..., "other": ...}``."""
    from onnx import TensorProto

    from compressor_onnx.external import external_reference, is_external, tensor_nbytes

    floating = {getattr(TensorProto, name) for name in CONSTANT_WEIGHT_TYPES}
    totals = {"float": 0, "other": 0}
    for tensor in model.graph.initializer:
        if is_external(tensor):
            size = external_reference(tensor)[2]
        elif tensor.HasField("raw_data"):
            size = len(tensor.raw_data)
        else:
            size = tensor_nbytes(tensor)
        totals["float" if tensor.data_type in floating else "other"] += size
    return totals


def shrink_facts(before: dict[str, int], after: dict[str, int], moved: int, mode: str) -> tuple[list[str], dict[str, Any]]:
    """Notes and metadata comparing the weights before and after a quantize step."""
    notes: list[str] = []
    metadata: dict[str, Any] = {
        "weight_bytes_before": before["float"] + before["other"],
        "weight_bytes_after": after["float"] + after["other"],
        "float_weight_bytes_after": after["float"],
    }
    if moved:
        metadata["constant_weights_converted"] = moved
        notes.append(f"{moved} Constant-node weight(s) became initializers before quantizing")
    total_before = before["float"] + before["other"]
    total_after = after["float"] + after["other"]
    if mode != "fp16" and before["float"] and total_after >= NOT_SHRUNK * total_before:
        notes.append(
            f"quantize {mode}: the weights did not shrink ({total_before / 1e6:.2f} MB before, "
            f"{total_after / 1e6:.2f} MB after): no weight this mode quantizes was found, "
            "see float_nodes"
        )
    return notes, metadata
