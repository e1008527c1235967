"""The numbers of ONNX Runtime's static QDQ quantization, for one tensor at a time.

Each function is what ``QDQQuantizer`` computes (onnxruntime/quantization/qdq_quantizer.py,
base_quantizer.py) written for one array: per-channel parameters come from the same
``compute_scale_zp`` on each channel's minimum and maximum, values are rounded as
``quantize_nparray`` rounds them (float32 division, round half to even, zero point added,
clipped to the type's full range), so int8_static_stream.py writes the bytes
``quantize_static`` writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def initializer_params(array: Any, axis: int | None, weight: bool, activation_type: int,
                       reduce_range: bool) -> tuple[Any, Any]:
    """``(zero_point, scale)`` of an initializer: a weight is symmetric int8; an initializer
    quantized as an activation (a Gather's data) asymmetric in the activation type, per tensor."""
    import numpy as np
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    qtype = TensorProto.INT8 if weight else activation_type
    symmetric = weight or axis is not None
    qmin, qmax = get_qmin_qmax_for_qType(qtype, reduce_range=reduce_range, symmetric=symmetric)
    if axis is None:
        lows, highs = [array.min() if array.size else 0.0], [array.max() if array.size else 0.0]
    else:
        others = tuple(i for i in range(array.ndim) if i != axis)
        lows, highs = array.min(axis=others), array.max(axis=others)
    pairs = [compute_scale_zp(np.array(low, dtype=array.dtype), np.array(high, dtype=array.dtype),
                              qmin, qmax, symmetric) for low, high in zip(lows, highs)]
    zero_points = np.array([pair[0] for pair in pairs], dtype=qmin.dtype)
    scales = np.array([pair[1] for pair in pairs], dtype=array.dtype)
    if axis is None:
        return zero_points.reshape(()), scales.reshape(())
    return zero_points, scales


def quantize_values(array: Any, scale: Any, zero_point: Any, axis: int | None) -> Any:
    """``quantize_nparray`` over the whole tensor, per slice along ``axis`` when given."""
    import numpy as np
    from onnx import helper
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    qtype = helper.np_dtype_to_tensor_dtype(zero_point.dtype)
    shape = [1] * array.ndim
    if axis is not None:
        shape[axis] = -1
    values = np.divide(array.astype(np.float32, copy=False), np.reshape(scale, shape), dtype=np.float32)
    np.round(values, out=values)
    values += np.reshape(zero_point, shape)
    low, high = get_qmin_qmax_for_qType(qtype)
    np.clip(values, low, high, out=values)
    return values.astype(zero_point.dtype)


def adjust_for_biases(scale: Any, zero_point: Any, per_channel: bool, biases: Sequence[tuple[Any, Any]],
                      weight: str) -> Any:
    """A weight's scale raised where a bias it meets (``(input scale, bias values)`` pairs) would
    overflow int32 at scale input x weight: ONNX Runtime's ``_adjust_weight_scale_for_int32_bias``,
    applied once per bias in turn, only to symmetric weights (every zero point 0)."""
    import numpy as np
    from onnx import numpy_helper
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    # ONNX Runtime's own method (it uses nothing of the quantizer but its arguments); a release
    # without it does not adjust in quantize_static either.
    adjust = getattr(QDQQuantizer, "_adjust_weight_scale_for_int32_bias", None)
    if np.any(zero_point) or adjust is None:
        return scale
    for input_scale, values in biases:
        changed, adjusted = adjust(  # noqa: SLF001
            None, np.asarray(input_scale, np.float32), scale.copy(), weight, numpy_helper.from_array(values),
            per_channel)
        if changed:
            scale = adjusted
    return scale


def quantize_bias(values: Any, input_scale: Any, weight_scale: Any, beta: float) -> dict[str, Any]:
    """``quantize_bias_static_impl``: int32 values, scale input x weight x beta, zero points 0."""
    import numpy as np

    if beta == 0:
        values, beta = np.zeros_like(values), 1.0
    scale = input_scale * weight_scale * beta
    quantized = np.round(np.asarray(values, dtype=np.float64) / np.asarray(scale, dtype=np.float64))
    limits = np.iinfo(np.int32)
    quantized = np.clip(quantized, np.float64(limits.min), np.float64(limits.max)).astype(np.int32)
    scale_values = np.asarray(scale, dtype=values.dtype).reshape(-1)
    zero_points = np.zeros(scale_values.shape, np.int32) if scale_values.size > 1 else np.zeros((), np.int32)
    return {"bias_quantized": quantized.reshape(values.shape), "bias_scale": scale_values,
            "bias_zero_point": zero_points}
