"""What both streamed static int8 paths share (int8_static_stream.py for any graph,
int8_static_transformer.py for transformers): value types by shape inference, activation
ranges calibrated in a forked child next to hard links of the model's data, and
:class:`StreamedValues`, the producers of every scale, zero point and quantized tensor.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from compressor.plugin import CompressionError, Context, Step, first_line
from compressor_onnx.external import Producer, is_external, load_skeleton, read_array, write_model
from compressor_onnx.int8_static_graph import Emitted, QdqPlan


def float_values(source: Path, scratch: Path) -> set[str]:
    """Names of the float32 values ONNX shape inference types (inferred by path: no weights read)."""
    import onnx
    from onnx import TensorProto

    inferred = scratch / "inferred.onnx"
    try:
        onnx.shape_inference.infer_shapes_path(str(source), str(inferred))
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as error:
        raise CompressionError(f"shape inference failed ({first_line(error)})") from None
    graph = load_skeleton(inferred).graph
    inferred.unlink()
    return {value.name for value in (*graph.value_info, *graph.input, *graph.output)
            if value.type.tensor_type.elem_type == TensorProto.FLOAT}


def calibrate(model: Any, path: Path, names: list[str], step: Step, context: Context,
              scales: dict[str, Any] | None = None) -> tuple[dict[str, tuple[Any, Any]], int]:
    """``{name: (lowest, highest)}`` of ``model`` (whose data resolves next to ``path``) over the
    calibration data, in a forked child, and that child's peak RSS."""
    from compressor.plugin import run_in_fork
    from compressor_onnx.static_calibration import calibration_feeds

    assert context.calibration_data is not None, "checked by quantize_static_large"
    batches = calibration_feeds(model, context.calibration_data, int(step.params.get("calibration_samples", 128)),
                                context.options).batches()
    method = str(step.params.get("calibration_method", "minmax"))
    return run_in_fork(_calibrate, model, path, names, batches, method, scales, step=f"quantize {step.mode}")


def _calibrate(model: Any, path: Path, names: list[str], batches: list[dict[str, Any]], method: str,
               scales: dict[str, Any] | None) -> tuple[dict[str, tuple[Any, Any]], int]:
    from compressor.plugin import peak_rss_bytes
    from compressor_onnx.quantize_common import quiet_ort
    from compressor_onnx.transformer_ranges import calibrated_ranges

    try:
        with quiet_ort():
            data = calibrated_ranges(model, path, names, batches, method, scales)
    except Exception as error:  # noqa: BLE001 - ONNX Runtime raises its own types
        raise CompressionError(f"static quantization's calibration failed ({first_line(error)})") from None
    ranges = {name: tuple(data[name].range_value) for name in names}
    return ranges, peak_rss_bytes()


def link_data(model: Any, source: Path, scratch: Path) -> Path:
    """A path in ``scratch`` next to which ``model``'s external data resolves: its data files
    hard-linked there (ONNX Runtime refuses data outside a model's folder, symlinks too), or,
    on another filesystem, the model written there with one data file.

    Each link is checked to be the file ``safety.open_external`` opened (the same inode): a
    data file swapped for a symlink or another file meanwhile is refused, never linked."""
    from compressor.plugin import UnsafeInputError
    from compressor_onnx.external import external_reference
    from compressor_onnx.safety import open_external

    locations = {external_reference(tensor)[0] for tensor in model.graph.initializer if is_external(tensor)}
    for location in sorted(locations):
        linked = scratch / location
        linked.parent.mkdir(parents=True, exist_ok=True)
        descriptor = open_external(source.parent, location, source)
        try:
            opened = os.fstat(descriptor)
            try:
                os.link(source.parent / location, linked, follow_symlinks=False)
            except OSError:
                return _written_copy(model, source, scratch)
            found = os.lstat(linked)
            if (found.st_dev, found.st_ino) != (opened.st_dev, opened.st_ino):
                raise UnsafeInputError(f"external data file {location!r} changed while it was being read", source)
        finally:
            os.close(descriptor)
    return scratch / source.name


def _written_copy(model: Any, source: Path, scratch: Path) -> Path:
    """The model written into ``scratch`` with one data file (read through ``safety``)."""
    copy = model.__class__()
    copy.CopyFrom(model)
    target = scratch / "copy" / source.name
    target.parent.mkdir()
    write_model(copy, target, source.parent)
    return target


class StreamedValues:
    """Scales, zero points and quantized values, each computed when the writer asks for it."""

    def __init__(self, plan: QdqPlan, originals: dict[str, Any], folder: Path, activation_type: int,
                 reduce_range: bool, ranges: dict[str, tuple[Any, Any]],
                 sources: dict[str, Producer] | None = None) -> None:
        self.plan, self.originals, self.folder = plan, originals, folder
        #: Initializers whose contents come from a producer, not the file (SmoothQuant's weights).
        self.sources = dict(sources or {})
        self.activation_type, self.reduce_range = activation_type, reduce_range
        self.activations = {name: _activation_params(low, high, activation_type) for name, (low, high) in ranges.items()}
        self.params: dict[str, tuple[Any, Any]] = {}
        self.quantized: dict[str, Any] = {}

    def initializer_types(self) -> dict[str, int]:
        from onnx import TensorProto

        return {name: TensorProto.INT8 if marked.kind == "weight" else self.activation_type
                for name, marked in self.plan.tensors.items() if name in self.originals}

    def producers(self, emitted: Emitted) -> dict[str, Producer]:
        return {name: self._producer(tensor, part) for name, (tensor, part) in emitted.parts.items()}

    def _producer(self, tensor: str, part: str) -> Producer:
        def produce() -> Any:
            if part == "quantized":
                self._weight(tensor)
                return self.quantized.pop(tensor)
            if part in ("zero_point", "scale"):
                return self._weight(tensor)[0 if part == "zero_point" else 1]
            return self._bias(tensor)[part]
        return produce

    def _weight(self, name: str) -> tuple[Any, Any]:
        """``(zero_point, scale)`` of a quantized initializer; its values wait in ``quantized``."""
        if name not in self.params:
            from compressor_onnx.int8_static_values import (
                adjust_for_biases,
                initializer_params,
                quantize_values,
            )

            marked = self.plan.tensors[name]
            array = self._read(name)
            weight = marked.kind == "weight"
            zero_point, scale = initializer_params(array, marked.axis, weight, self.activation_type, self.reduce_range)
            if weight:
                biases = [(self.activations[bias.input][1], self._read(bias.source))
                          for bias in self.plan.biases.values()
                          if bias.weight == name and bias.input in self.activations]
                scale = adjust_for_biases(scale, zero_point, marked.axis is not None, biases, name)
            self.params[name] = (zero_point, scale)
            self.quantized[name] = quantize_values(array, scale, zero_point, marked.axis)
        return self.params[name]

    def _bias(self, name: str) -> dict[str, Any]:
        from compressor_onnx.int8_static_values import quantize_bias

        bias = self.plan.biases[name]
        return quantize_bias(self._read(bias.source),
                             self._scale(bias.input), self._scale(bias.weight), bias.beta)

    def _read(self, name: str) -> Any:
        return self.sources[name]() if name in self.sources else read_array(self.originals[name], self.folder)

    def _scale(self, name: str) -> Any:
        """The scale the quantized graph gives ``name`` (its provider's, where it shares one)."""
        while (marked := self.plan.tensors.get(name)) is not None and marked.provider is not None:
            name = marked.provider
        if name not in self.originals:
            return self.activations[name][1]
        return self._weight(name)[1]


def _activation_params(low: Any, high: Any, activation_type: int) -> tuple[Any, Any]:
    """``quantize_static``'s ``calc_quant_params``: asymmetric, no reduced range."""
    import numpy as np
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    qmin, qmax = get_qmin_qmax_for_qType(activation_type, reduce_range=False, symmetric=False)
    zero_point, scale = compute_scale_zp(np.asarray(low, np.float32), np.asarray(high, np.float32), qmin, qmax, False)
    return np.asarray(zero_point).squeeze(), np.asarray(scale).squeeze()
