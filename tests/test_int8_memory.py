"""Static int8 calibration of the transformer path (transformer_ranges.py): the same ranges
as ONNX Runtime's own calibrators, from state that does not grow with the examples."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator
from onnxruntime.quantization.calibrate import HistogramCollector

from compressor_onnx.transformer_ranges import calibrated_ranges

CALIBRATED = ["x", "hidden"]
METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
           "entropy": CalibrationMethod.Entropy}


def two_matmuls(path: Path, sequence: int = 8, width: int = 16) -> None:
    """x [batch, sequence, width] -> MatMul -> Relu (hidden) -> MatMul -> y."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"], name="up"),
        helper.make_node("Relu", ["h0"], ["hidden"], name="relu"),
        helper.make_node("MatMul", ["hidden", "w1"], ["y"], name="down"),
    ]
    graph = helper.make_graph(
        nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", sequence, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", sequence, width])],
        [numpy_helper.from_array(rng.normal(0, 0.3, (width, 2 * width)).astype(np.float32), "w0"),
         numpy_helper.from_array(rng.normal(0, 0.3, (2 * width, width)).astype(np.float32), "w1")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def batches(examples: int, sequence: int = 8, width: int = 16, batch: int = 8) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    x = (rng.standard_t(3, (examples, sequence, width)) * 0.7 + 0.2).astype(np.float32)
    return [{"x": x[start : start + batch]} for start in range(0, examples, batch)]


def onnx_runtime_ranges(path: Path, feeds: list[dict[str, Any]], method: str, folder: Path) -> Any:
    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.remaining = iter(feeds)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.remaining, None)

    calibrator = create_calibrator(path, ["MatMul"], augmented_model_path=str(folder / "augmented.onnx"),
                                   calibrate_method=METHODS[method])
    calibrator.collect_data(Reader())
    return calibrator.compute_data()


@pytest.mark.parametrize("method", list(METHODS))
def test_ranges_equal_onnx_runtime_calibrators(method: str, tmp_path: Path) -> None:
    path = tmp_path / "two.onnx"
    two_matmuls(path)
    feeds = batches(24)
    ours = calibrated_ranges(onnx.load(str(path)), path, CALIBRATED, feeds, method)
    theirs = onnx_runtime_ranges(path, feeds, method, tmp_path)
    assert ours.calibration_method == theirs.calibration_method
    for name in CALIBRATED:
        for mine, reference in zip(ours[name].range_value, theirs[name].range_value):
            assert mine.dtype == reference.dtype and np.array_equal(mine, reference), (name, mine, reference)
        if method != "minmax":
            assert np.array_equal(ours[name].hist, theirs[name].hist)
            assert np.array_equal(ours[name].bins, theirs[name].bins)
    assert not list(tmp_path.glob("*probe*"))


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_a_short_last_batch_is_calibrated_as_one_histogram_of_every_value(method: str, tmp_path: Path) -> None:
    """20 examples in batches of 8 (ONNX Runtime's histogram calibrators cannot stack them)."""
    path = tmp_path / "two.onnx"
    two_matmuls(path)
    feeds = batches(20)
    ours = calibrated_ranges(onnx.load(str(path)), path, ["x"], feeds, method)
    values = np.concatenate([feed["x"].ravel() for feed in feeds])
    collector = HistogramCollector(method=method, symmetric=method == "percentile",
                                   num_bins=2048 if method == "percentile" else 128, num_quantized_bins=128,
                                   percentile=99.999, scenario="same")
    collector.collect({"x": values})
    reference = collector.compute_collection_result()["x"]
    assert np.array_equal(ours["x"].range_value[0], reference[0])
    assert np.array_equal(ours["x"].range_value[1], reference[1])
    assert np.array_equal(ours["x"].hist, reference[2])


def test_calibration_memory_does_not_grow_with_the_examples(tmp_path: Path) -> None:
    """O(tensors) state: 32x the examples, about the same traced peak (ONNX Runtime's
    histogram calibrators keep every batch's activations: ~32x)."""
    sequence, width = 64, 128
    path = tmp_path / "two.onnx"
    two_matmuls(path, sequence, width)
    skeleton = onnx.load(str(path))

    def traced_peak(examples: int) -> int:
        feeds = batches(examples, sequence, width)
        tracemalloc.start()
        try:
            calibrated_ranges(skeleton, path, CALIBRATED, feeds, "percentile")
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    few, many = traced_peak(16), traced_peak(512)
    one_batch = 8 * sequence * 3 * width * 4  # x and hidden of one batch, float32
    assert many < few + one_batch, (few, many)
