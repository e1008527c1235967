"""Activation ranges for the transformer static path, folded in one calibration batch at a time.

ONNX Runtime's ``quantize_static`` calibrates an augmented copy of the model in which every
MatMul/Gemm input and output is a graph output (with a ReduceMin and a ReduceMax each for
minmax), and its histogram calibrators (percentile, entropy) keep every calibrated
activation of every batch until the pass ends. On all-MiniLM-L6-v2 that calibration took
~470 MB of the static path's 1.7 GB peak with minmax, and 5.8 GB with percentile (it
grows with the number of examples). Here the probe's outputs are only the tensors the
quantizer reads (the activation input of each quantized MatMul/Gemm), and each batch is
folded into per-tensor statistics and dropped: memory is O(tensors), not
O(examples x tensors).

The statistics are the ones ONNX Runtime's calibrators compute over all examples at once,
from the same session settings (no graph optimization, as its calibrators run), so
``quantize_static`` reading them from a calibration cache writes the same model:

* minmax: the minimum and maximum of each tensor, reduced in the graph (ReduceMin and
  ReduceMax, as ONNX Runtime's minmax calibrator reduces them), so no activation is an output;
* percentile (symmetric): a histogram of |x| over [min |x|, max |x|] with 2048 bins, one
  pass for the bounds and one for the counts, since one histogram of every value equals
  the sum of per-batch histograms over the same edges;
* entropy: a histogram of x over [-t, t] (t = max |x|) with 128 bins, likewise.

ONNX Runtime's ``HistogramCollector`` then turns the histograms into thresholds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: ONNX Runtime's ``create_calibrator`` defaults for its histogram calibrators.
PERCENTILE_BINS = 2048
PERCENTILE = 99.999
ENTROPY_BINS = 128
ENTROPY_QUANTIZED_BINS = 128


def calibration_session(path: Path, optimize: bool) -> Any:
    """A CPU session; ``optimize=False`` runs the graph as ONNX Runtime's calibrators do,
    without graph optimizations (the same kernels, so the same values)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def probed_outputs(skeleton: Any, path: Path, names: Sequence[str], batches: Sequence[dict[str, Any]],
                   optimize: bool, extremes_of: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """``{name: value}`` of the named tensors, one calibration batch at a time (a model past the
    large-model threshold: one piece of it at a time, segments.py, each dict then holds the
    tensors of one piece).

    ``skeleton`` is the model at ``path`` without its external data; the probe (it with
    ``names`` as its only outputs), or each piece of it, is written next to ``path``, so that
    its external data resolves, and removed once loaded. With ``extremes_of`` (``{name: scales or None}``) each
    value is ``[min, max]`` of the tensor (times its last-axis scales), reduced in the graph as
    ONNX Runtime's minmax calibrator reduces it: a batch's activations are never outputs, so
    they cost no memory past the graph's own."""
    import numpy as np
    import onnx

    from compressor_onnx.segments import PieceRunner, pieces_for

    probe = onnx.ModelProto()
    probe.CopyFrom(skeleton)
    outputs = list(names) if extremes_of is None else _add_extremes(probe.graph, names, extremes_of)
    pieces = pieces_for(probe, outputs)
    with PieceRunner(probe, path, pieces, lambda written: calibration_session(written, optimize)) as runner:
        for index in range(len(pieces)):
            for values in runner.run(index, batches):
                if extremes_of is None:
                    yield values
                    continue
                yield {name: np.array([values[low], values[high]]) for name, (low, high)
                       in zip(names, zip(outputs[0::2], outputs[1::2])) if low in values}


def _add_extremes(graph: Any, names: Sequence[str], scales: Mapping[str, Any]) -> list[str]:
    """``ReduceMin``/``ReduceMax`` over every axis of each tensor (after a ``Mul`` by its scales),
    each right after the node producing it: the names of their outputs, min and max of each
    tensor in turn."""
    from onnx import helper, numpy_helper

    outputs = []
    after: dict[str, list[Any]] = {}
    for index, name in enumerate(names):
        added = []
        value = name
        if scales.get(name) is not None:
            factor = numpy_helper.from_array(scales[name], f"compressor_probe_scale_{index}")
            graph.initializer.append(factor)
            value = f"compressor_probe_scaled_{index}"
            added.append(helper.make_node("Mul", [name, factor.name], [value], f"compressor_probe_mul_{index}"))
        for reduce in ("ReduceMin", "ReduceMax"):
            output = f"compressor_probe_{reduce.lower()}_{index}"
            added.append(helper.make_node(reduce, [value], [output], f"compressor_probe_{reduce}_{index}", keepdims=0))
            outputs.append(output)
        after.setdefault(name, []).extend(added)
    nodes = [node for value in graph.input for node in after.pop(value.name, [])]
    for node in graph.node:
        nodes.append(node)
        nodes += [probe for output in node.output for probe in after.pop(output, [])] if after else []
    del graph.node[:]
    graph.node.extend(nodes)
    if after:
        raise ValueError(f"the graph computes no tensor named {', '.join(after)}")
    return outputs


@dataclass
class Extremes:
    """Minimum and maximum of a tensor's values (float32, NaN ignored) and, when asked for,
    of their magnitudes."""

    magnitudes: bool = False
    low: Any = None
    high: Any = None
    magnitude_low: Any = None
    magnitude_high: Any = None

    def add(self, array: Any) -> None:
        import numpy as np

        values = np.asarray(array)
        if values.size == 0:
            return
        low, high = np.nanmin(values), np.nanmax(values)
        self.low = low if self.low is None else min(self.low, low)
        self.high = high if self.high is None else max(self.high, high)
        if self.magnitudes:
            magnitudes = np.abs(values)
            low, high = np.nanmin(magnitudes), np.nanmax(magnitudes)
            self.magnitude_low = low if self.magnitude_low is None else min(self.magnitude_low, low)
            self.magnitude_high = high if self.magnitude_high is None else max(self.magnitude_high, high)


class Histogram:
    """Counts over fixed edges, added to batch by batch."""

    def __init__(self, bins: int, bounds: tuple[Any, Any], magnitudes: bool) -> None:
        self.bins, self.bounds, self.magnitudes = bins, bounds, magnitudes
        self.counts: Any = None
        self.edges: Any = None

    def add(self, array: Any) -> None:
        import numpy as np

        values = np.asarray(array).ravel()
        if self.magnitudes:
            values = np.absolute(values)
        counts, edges = np.histogram(values, bins=self.bins, range=self.bounds)
        if self.counts is None:
            self.counts, self.edges = counts, edges
        else:
            self.counts += counts


def calibrated_ranges(skeleton: Any, path: Path, names: Sequence[str], batches: Sequence[dict[str, Any]],
                      method: str, scales: Mapping[str, Any] | None = None) -> Any:
    """ONNX Runtime ``TensorsData`` for ``names`` of the model at ``path`` by ``method``;
    a tensor named in ``scales`` is calibrated as its values times those (last-axis) scales,
    as a ``Mul`` by them would give it (SmoothQuant's inputs, without writing that graph)."""
    import numpy as np
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

    scales = scales or {}

    def probed(reduced: bool = False) -> Iterator[dict[str, Any]]:
        if reduced:
            yield from probed_outputs(skeleton, path, names, batches, optimize=False,
                                      extremes_of={name: scales.get(name) for name in names})
            return
        for outputs in probed_outputs(skeleton, path, names, batches, optimize=False):
            yield {name: value * scales[name] if name in scales else value for name, value in outputs.items()}

    extremes = {name: Extremes(magnitudes=method == "percentile") for name in names}
    for outputs in probed(reduced=method == "minmax"):
        for name, value in outputs.items():
            extremes[name].add(value)
    missing = [name for name, found in extremes.items() if found.low is None]
    if missing:
        raise ValueError(f"no calibration values reached {', '.join(missing)}")
    if method == "minmax":
        pairs = {name: (np.array([found.low], np.float32), np.array([found.high], np.float32))
                 for name, found in extremes.items()}
        return TensorsData(CalibrationMethod.MinMax, pairs)
    histograms = {name: _histogram(method, found) for name, found in extremes.items()}
    for outputs in probed():
        for name, value in outputs.items():
            histograms[name].add(value)
    collector = _collector(method)
    for name, histogram in histograms.items():
        found = extremes[name]
        if method == "percentile":
            entry: tuple[Any, ...] = (histogram.counts, histogram.edges.astype(np.float32), found.low, found.high)
        else:
            entry = (histogram.counts, histogram.edges, found.low, found.high, histogram.bounds[1])
        collector.histogram_dict[name] = entry
    calibration = CalibrationMethod.Percentile if method == "percentile" else CalibrationMethod.Entropy
    return TensorsData(calibration, collector.compute_collection_result())


def _histogram(method: str, found: Extremes) -> Histogram:
    """The histogram ONNX Runtime's collector would make of every value at once."""
    import numpy as np

    if method == "percentile":
        return Histogram(PERCENTILE_BINS, (found.magnitude_low, found.magnitude_high), magnitudes=True)
    threshold = np.array(max(abs(found.low), abs(found.high)), dtype=np.float32)
    return Histogram(ENTROPY_BINS, (-threshold, threshold), magnitudes=False)


def _collector(method: str) -> Any:
    from onnxruntime.quantization.calibrate import HistogramCollector

    if method == "percentile":
        return HistogramCollector(method="percentile", symmetric=True, num_bins=PERCENTILE_BINS,
                                  num_quantized_bins=ENTROPY_QUANTIZED_BINS, percentile=PERCENTILE, scenario="same")
    return HistogramCollector(method="entropy", symmetric=False, num_bins=ENTROPY_BINS,
                              num_quantized_bins=ENTROPY_QUANTIZED_BINS, percentile=PERCENTILE, scenario="same")
