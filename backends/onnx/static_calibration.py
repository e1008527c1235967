"""Calibration for static int8: feeding the data as measuring does, and collecting every
activation's range once for several calibration methods.

Feeding (``CalibrationFeeds``) goes through core's :mod:`compressor.feeding`: scalar inputs
(a 0-d sample rate) are given whole to every call, inputs whose examples run along another
axis are sliced there, and a stateful model (``--set state.OUT=IN``) runs one example at a
time with each call's ``OUT`` fed to the next call's ``IN``, exactly as the runtime is
measured. Models whose graph fixes the batch size are fed batches of that size.

Collecting (``RangeCollector``): ONNX Runtime's histogram calibrator adds every tensor it
would calibrate as a graph output; one pass over the calibration examples keeps, per tensor,
the exact minimum and maximum and a histogram (of at most ``HISTOGRAM_SAMPLE`` values per
call, evenly strided), from which the minmax, percentile and entropy ranges all come, as
``TensorsData`` that ``quantize_static`` takes through its calibration cache. ONNX Runtime's
own calibrators run the model once per method, and its entropy calibrator's default 128 bins
leave nothing to choose (its thresholds then equal minmax's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.plugin import STATE_PREFIX, Dataset, Examples, UsageError, examples_from_data

CALIBRATION_BATCH = 8
#: Signed histogram bins at the start (2048 a side, ONNX Runtime's percentile resolution).
HISTOGRAM_BINS = 4096
#: Past this many bins a side, a histogram halves its resolution instead of growing.
MAX_HALF_BINS = 16384
#: Values per tensor and call that go into its histogram (minimum and maximum see them all).
HISTOGRAM_SAMPLE = 1 << 16
#: ONNX Runtime's defaults for the percentile and entropy calibrators.
PERCENTILE = 99.999
QUANTIZED_BINS = 128
#: Thresholds the entropy method tries per tensor.
ENTROPY_THRESHOLDS = 64
METHODS = ("minmax", "percentile", "entropy")


@dataclass
class CalibrationFeeds:
    """The calibration examples and how they are fed: batch size, padding, carried state."""

    examples: Examples
    batch: int
    pad_to: int | None = None
    #: ``{output: input}`` pairs of a stateful model.
    state: dict[str, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return self.examples.count

    def run(self, start: int, stop: int, call: Callable[[dict[str, Any]], Mapping[str, Any]]
            ) -> Iterator[tuple[dict[str, Any], Mapping[str, Any]]]:
        """Examples ``start`` to ``stop`` through ``call`` (feeds -> outputs by name), state carried."""
        previous: Mapping[str, Any] = {}
        for begin in range(start, stop, self.batch):
            feeds = self.examples.take(begin, min(begin + self.batch, stop), pad_to=self.pad_to)
            for output, target in self.state.items():
                if output in previous:
                    feeds[target] = previous[output]
            previous = call(feeds)
            yield feeds, previous

    def batches(self, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        """Feeds without running anything: a state input gets its value from the data."""
        end = self.count if stop is None else stop
        return [self.examples.take(begin, min(begin + self.batch, end), pad_to=self.pad_to)
                for begin in range(start, end, self.batch)]


def calibration_feeds(graph: Any, dataset: Dataset, samples: int,
                      options: Mapping[str, Any] | None = None) -> CalibrationFeeds:
    """The first ``samples`` examples of ``dataset`` fed to ``graph`` (a ModelProto) as measuring feeds them."""
    from compressor_onnx.kv_runtime import add_cache_inputs, cache_hidden, graph_cache_layout
    from compressor_onnx.shapes import graph_input_specs

    options = dict(options or {})
    specs = graph_input_specs(graph.graph)
    # A causal LM with a key/value cache calibrates on prefills of the data's tokens.
    layout = graph_cache_layout(graph)
    specs = cache_hidden(layout, specs, ())[0] if layout is not None else specs
    examples = examples_from_data(dataset, specs, options, limit=samples)
    if layout is not None:
        add_cache_inputs(examples, layout)
    outputs = {value.name for value in graph.graph.output}
    state = {key[len(STATE_PREFIX):]: str(value) for key, value in options.items() if key.startswith(STATE_PREFIX)}
    for output, target in state.items():
        if output not in outputs or target not in {spec.name for spec in specs}:
            raise UsageError(f"--set state.{output}={target}: the model has no output {output!r} "
                             f"or no input {target!r}")
    examples.state = state
    fixed = {spec.shape[axis] for spec in specs
             if (axis := examples.axes.get(spec.name)) is not None and axis < len(spec.shape)
             and isinstance(spec.shape[axis], int) and spec.shape[axis] > 0}
    if len(fixed) == 1:
        size = fixed.pop()
        return CalibrationFeeds(examples, size, size, state)
    return CalibrationFeeds(examples, 1 if state else CALIBRATION_BATCH, None, state)


class RangeCollector:
    """Every calibrated tensor's statistics over the examples run so far (more can follow)."""

    def __init__(self, model_path: Path, folder: Path) -> None:
        from onnxruntime.quantization import CalibrationMethod, create_calibrator
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        from compressor_onnx.quantize_common import quiet_ort

        with quiet_ort():
            calibrator = create_calibrator(
                model_path, sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
                augmented_model_path=str(folder / "augmented.onnx"), calibrate_method=CalibrationMethod.Entropy,
            )
        self.session = calibrator.infer_session
        self.names = [output.name for output in self.session.get_outputs()]
        self.stats = {name: TensorStatistics() for name in sorted(calibrator.tensors_to_calibrate)}

    def collect(self, feeds: CalibrationFeeds, start: int, stop: int) -> None:
        """Run examples ``start`` to ``stop`` and add what every calibrated tensor held."""
        for _, outputs in feeds.run(start, stop, self._call):
            for name, stat in self.stats.items():
                stat.add(outputs[name])

    def _call(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return dict(zip(self.names, self.session.run(self.names, inputs)))

    def ranges(self) -> dict[str, Any]:
        """``{method: TensorsData}`` for every method in :data:`METHODS`."""
        import numpy as np
        from onnxruntime.quantization import CalibrationMethod
        from onnxruntime.quantization.calibrate import TensorData, TensorsData

        methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                   "entropy": CalibrationMethod.Entropy}
        result = {}
        for method in METHODS:
            data = {}
            for name, stat in self.stats.items():
                low, high = stat.range(method)
                data[name] = TensorData(lowest=np.array(low, np.float32), highest=np.array(high, np.float32))
            result[method] = TensorsData(methods[method], data)
        return result


class TensorStatistics:
    """Exact minimum and maximum of a tensor over calls, and a signed histogram centred on zero."""

    def __init__(self) -> None:
        self.low, self.high = math.inf, -math.inf
        self.width = 0.0
        self.half = 0
        self.counts: Any = None

    def add(self, array: Any) -> None:
        import numpy as np

        values = np.asarray(array).ravel()
        if values.size == 0 or values.dtype.kind != "f":
            return
        values = values.astype(np.float32, copy=False)
        low, high = float(values.min()), float(values.max())
        if math.isnan(low) or math.isnan(high):
            values = values[np.isfinite(values)]
            if values.size == 0:
                return
            low, high = float(values.min()), float(values.max())
        self.low, self.high = min(self.low, low), max(self.high, high)
        if values.size > HISTOGRAM_SAMPLE:
            values = values[:: math.ceil(values.size / HISTOGRAM_SAMPLE)]
        self._cover(max(abs(low), abs(high)))
        index = np.floor(values / self.width).astype(np.int64) + self.half
        np.clip(index, 0, 2 * self.half - 1, out=index)
        self.counts += np.bincount(index, minlength=2 * self.half)

    def _cover(self, reach: float) -> None:
        """Grow the histogram (whole bins each side) until it reaches ``reach``."""
        import numpy as np

        if self.counts is None:
            self.half = HISTOGRAM_BINS // 2
            self.width = max(reach, 1e-12) / self.half
            self.counts = np.zeros(2 * self.half, np.int64)
        needed = math.ceil(reach / self.width)
        while needed > MAX_HALF_BINS:
            if self.half % 2:
                self.counts = np.pad(self.counts, 1)
                self.half += 1
            self.counts = self.counts.reshape(-1, 2).sum(axis=1)
            self.half //= 2
            self.width *= 2
            needed = math.ceil(reach / self.width)
        if needed > self.half:
            self.counts = np.pad(self.counts, needed - self.half)
            self.half = needed

    def range(self, method: str) -> tuple[float, float]:
        if self.counts is None:
            return 0.0, 0.0
        if method == "minmax":
            return self.low, self.high
        reach = self._percentile_reach() if method == "percentile" else self._entropy_reach()
        return max(-reach, self.low), min(reach, self.high)

    def _percentile_reach(self) -> float:
        """ONNX Runtime's symmetric percentile: the |x| below which PERCENTILE % of values lie."""
        import numpy as np

        magnitudes = self.counts[self.half:] + self.counts[: self.half][::-1]
        cumulative = np.cumsum(magnitudes) / max(int(magnitudes.sum()), 1)
        index = int(np.searchsorted(cumulative, PERCENTILE / 100.0))
        return (min(index, self.half - 1) + 1) * self.width

    def _entropy_reach(self) -> float:
        """The clipping threshold of |x| whose QUANTIZED_BINS-level quantization loses the least
        information (KL divergence: TensorRT's entropy calibration, which ONNX Runtime follows)."""
        import numpy as np
        from onnxruntime.quantization.calibrate import entropy
        from onnxruntime.quantization.quant_utils import smooth_distribution

        magnitudes = (self.counts[self.half:] + self.counts[: self.half][::-1]).astype(np.float64)
        # A ReLU's exact zeros pile up in the first bin and would pull the threshold down.
        magnitudes[0] = min(magnitudes[0], magnitudes[1])
        if self.half <= QUANTIZED_BINS:
            return self.half * self.width
        best, best_reach = math.inf, self.half * self.width
        for size in np.unique(np.linspace(QUANTIZED_BINS, self.half, ENTROPY_THRESHOLDS).astype(int)):
            sliced = magnitudes[:size]
            reference = sliced.copy()
            reference[-1] += magnitudes[size:].sum()
            merged = size // QUANTIZED_BINS
            used = merged * QUANTIZED_BINS
            present = (reference != 0).astype(np.float64)
            levels = sliced[:used].reshape(QUANTIZED_BINS, merged).sum(axis=1)
            levels[-1] += sliced[used:].sum()
            counted = present[:used].reshape(QUANTIZED_BINS, merged).sum(axis=1)
            candidate = present.copy()
            candidate[:used] *= np.repeat(np.where(counted > 0, levels / np.maximum(counted, 1), 0.0), merged)
            candidate[used:] *= levels[-1] / max(counted[-1], 1)
            p, q = smooth_distribution(reference), smooth_distribution(candidate)
            divergence = math.inf if p is None or q is None else float(entropy(p, q))
            if divergence < best:
                best, best_reach = divergence, size * self.width
        return best_reach
