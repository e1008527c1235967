"""Small ONNX graphs with the outputs real models have (maps, anchor heads, box + score
pairs, CTC, multi-label, one probability, NaN once quantized), built with onnx.helper in
milliseconds, and a helper that measures an original and a variant with ONNX
Runtime in this process, as the measuring processes do, and compares them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Quick timing: the tests are about the outputs, not latency.
QUICK_SETTINGS = {"warmup": 1, "min_iterations": 2, "min_seconds": 0.0, "batch_size": 4}


def save_graph(path: Path, nodes: list[Any], inputs: dict[str, list[Any]], outputs: dict[str, list[Any]],
               weights: dict[str, Any]) -> Path:
    """An opset-17 float graph: ``inputs``/``outputs`` name -> shape ("N" for the batch)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def values(specs: dict[str, list[Any]]) -> list[Any]:
        return [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in specs.items()]

    initializers = []
    for name, value in weights.items():
        array = np.asarray(value)
        initializers.append(numpy_helper.from_array(array.astype(np.int64 if array.dtype.kind == "i" else np.float32),
                                                    name))
    graph = helper.make_graph(nodes, path.stem, values(inputs), values(outputs), initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def node(op: str, inputs: list[str], outputs: list[str], **attributes: Any) -> Any:
    from onnx import helper

    return helper.make_node(op, inputs, outputs, **attributes)


def face_map(path: Path, shift: float = 0.0) -> Path:
    """P-Net-like: ``prob`` [N, 2, H, W] softmax over channels, ``reg`` [N, 4, H, W] box offsets."""
    rng = np.random.default_rng(0)
    weights = {"wp": rng.normal(size=(2, 3, 3, 3)), "bp": np.array([float(shift), 0.0]),
               "wr": rng.normal(size=(4, 3, 3, 3)), "br": np.zeros(4)}
    nodes = [node("Conv", ["x", "wp", "bp"], ["logits"], pads=[1, 1, 1, 1]),
             node("Softmax", ["logits"], ["prob"], axis=1),
             node("Conv", ["x", "wr", "br"], ["reg"], pads=[1, 1, 1, 1])]
    return save_graph(path, nodes, {"x": ["N", 3, 12, 16]},
                      {"prob": ["N", 2, 12, 16], "reg": ["N", 4, 12, 16]}, weights)


def text_map(path: Path, bias: float = 0.0) -> Path:
    """DBNet-like: one probability channel ``[N, 1, H, W]``."""
    rng = np.random.default_rng(1)
    nodes = [node("Conv", ["x", "w", "b"], ["logits"], pads=[1, 1, 1, 1]), node("Sigmoid", ["logits"], ["map"])]
    return save_graph(path, nodes, {"x": ["N", 3, 12, 16]}, {"map": ["N", 1, 12, 16]},
                      {"w": rng.normal(size=(1, 3, 3, 3)), "b": np.array([float(bias)])})


def anchor_head(path: Path, score_bias: float = 0.0, classes: int = 3) -> Path:
    """YOLOv8-like ``[N, 4+C, A]``: features 0-3 of each anchor are its box (centre and size
    in pixels), the others give class scores through a sigmoid."""
    rng = np.random.default_rng(2)
    weights = {"w": rng.normal(size=(4, classes)) * 3, "b": np.full(classes, float(score_bias)),
               "starts": np.array([0]), "mid": np.array([4]), "ends": np.array([8]), "axis": np.array([2])}
    nodes = [node("Slice", ["x", "starts", "mid", "axis"], ["box"]),
             node("Slice", ["x", "mid", "ends", "axis"], ["features"]),
             node("MatMul", ["features", "w"], ["scored"]), node("Add", ["scored", "b"], ["logits"]),
             node("Sigmoid", ["logits"], ["scores"]), node("Concat", ["box", "scores"], ["rows"], axis=2),
             node("Transpose", ["rows"], ["output0"], perm=[0, 2, 1])]
    return save_graph(path, nodes, {"x": ["N", 128, 8]}, {"output0": ["N", 4 + classes, 128]}, weights)


def anchor_data(path: Path, count: int = 12) -> Path:
    rng = np.random.default_rng(3)
    x = np.zeros((count, 128, 8), np.float32)
    x[..., :2] = rng.uniform(20, 300, (count, 128, 2))
    x[..., 2:4] = rng.uniform(8, 40, (count, 128, 2))
    x[..., 4:] = rng.normal(size=(count, 128, 4))
    np.savez(path, x=x)
    return path


def box_score_pair(path: Path, box_offset: float = 0.0) -> Path:
    """UltraFace-like: ``boxes`` [N, A, 4] corners and ``scores`` [N, A, 2] (background, face)."""
    rng = np.random.default_rng(4)
    weights = {"w": rng.normal(size=(4, 2)) * 2, "offset": np.array([float(box_offset)]),
               "s0": np.array([0]), "s2": np.array([2]), "s4": np.array([4]), "s8": np.array([8]),
               "axis": np.array([2])}
    nodes = [node("Slice", ["x", "s0", "s2", "axis"], ["corner"]),
             node("Slice", ["x", "s2", "s4", "axis"], ["size"]), node("Abs", ["size"], ["positive"]),
             node("Add", ["corner", "positive"], ["far"]), node("Concat", ["corner", "far"], ["placed"], axis=2),
             node("Add", ["placed", "offset"], ["boxes"]),
             node("Slice", ["x", "s4", "s8", "axis"], ["features"]), node("MatMul", ["features", "w"], ["logits"]),
             node("Softmax", ["logits"], ["scores"], axis=2)]
    return save_graph(path, nodes, {"x": ["N", 96, 8]}, {"boxes": ["N", 96, 4], "scores": ["N", 96, 2]}, weights)


def pair_data(path: Path, count: int = 12) -> Path:
    rng = np.random.default_rng(5)
    x = np.zeros((count, 96, 8), np.float32)
    x[..., :2] = rng.uniform(0, 1, (count, 96, 2))
    x[..., 2:4] = rng.uniform(0.05, 0.2, (count, 96, 2))
    x[..., 4:] = rng.normal(size=(count, 96, 4))
    np.savez(path, x=x)
    return path


def ctc_recognizer(path: Path, blank_bias: float = 7.0, time_major: bool = False) -> Path:
    """A CRNN head: ``[N, T, C]`` log-probabilities (``[T, N, C]`` when ``time_major``),
    class 0 the blank; ``blank_bias`` 100 makes every position blank."""
    rng = np.random.default_rng(6)
    bias = np.zeros(12)
    bias[0] = blank_bias
    nodes = [node("MatMul", ["x", "w"], ["scored"]), node("Add", ["scored", "b"], ["logits"]),
             node("LogSoftmax", ["logits"], ["log_probs" if time_major else "out"], axis=2)]
    shape = ["N", 24, 12]
    if time_major:
        nodes.append(node("Transpose", ["log_probs"], ["out"], perm=[1, 0, 2]))
        shape = [24, "N", 12]
    return save_graph(path, nodes, {"x": ["N", 24, 6]}, {"out": shape},
                      {"w": rng.normal(size=(6, 12)) * 3, "b": bias})


def multi_label(path: Path, shift: float = 0.0, per_frame: bool = False) -> Path:
    """Independent sigmoids: ``[N, 6]``, or ``[N, 88, T]`` note activations when ``per_frame``;
    ``shift`` moves every logit (a variant deciding some elements otherwise)."""
    rng = np.random.default_rng(7)
    if per_frame:
        nodes = [node("MatMul", ["x", "w"], ["scored"]), node("Add", ["scored", "b"], ["logits"]),
                 node("Sigmoid", ["logits"], ["frames"]), node("Transpose", ["frames"], ["notes"], perm=[0, 2, 1])]
        return save_graph(path, nodes, {"x": ["N", 20, 5]}, {"notes": ["N", 88, 20]},
                          {"w": rng.normal(size=(5, 88)) * 2, "b": np.full(88, float(shift))})
    nodes = [node("MatMul", ["x", "w"], ["scored"]), node("Add", ["scored", "b"], ["logits"]),
             node("Sigmoid", ["logits"], ["labels"])]
    return save_graph(path, nodes, {"x": ["N", 5]}, {"labels": ["N", 6]},
                      {"w": rng.normal(size=(5, 6)) * 2, "b": np.full(6, float(shift))})


def probability(path: Path) -> Path:
    """One probability per example, ``[N, 1]``."""
    rng = np.random.default_rng(8)
    nodes = [node("MatMul", ["x", "w"], ["logit"]), node("Sigmoid", ["logit"], ["p"])]
    return save_graph(path, nodes, {"x": ["N", 5]}, {"p": ["N", 1]}, {"w": rng.normal(size=(5, 1)) * 2})


def nan_when_quantized(path: Path) -> Path:
    """Class probabilities of ``scores / (x @ tiny + relu(x0))``: finite in float32, while
    per-tensor int8 weights round the tiny column to 0, so wherever ``x0 <= 0`` the
    quantized model divides by zero and its softmax returns NaN."""
    rng = np.random.default_rng(9)
    weights = rng.normal(size=(5, 4))
    weights[:, 3] = 1e-4
    nodes = [node("MatMul", ["x", "w"], ["all"]),
             node("Slice", ["all", "s0", "s3", "axis"], ["scores"]), node("Slice", ["all", "s3", "s4", "axis"], ["tiny"]),
             node("Slice", ["x", "s0", "s1", "axis"], ["first"]), node("Relu", ["first"], ["positive"]),
             node("Add", ["tiny", "positive"], ["denominator"]), node("Div", ["scores", "denominator"], ["ratio"]),
             node("Softmax", ["ratio"], ["probs"], axis=1)]
    return save_graph(path, nodes, {"x": ["N", 5]}, {"probs": ["N", 3]},
                      {"w": weights, "s0": np.array([0]), "s1": np.array([1]), "s3": np.array([3]),
                       "s4": np.array([4]), "axis": np.array([1])})


def face_crops(path: Path) -> Path:
    """O-Net-like, outputs unnamed: ``output_0`` boxes [N, 4], ``output_1`` landmarks [N, 10],
    ``output_2`` face probabilities [N, 2]."""
    rng = np.random.default_rng(10)
    nodes = [node("MatMul", ["x", "wb"], ["output_0"]), node("MatMul", ["x", "wl"], ["output_1"]),
             node("MatMul", ["x", "wp"], ["logits"]), node("Softmax", ["logits"], ["output_2"], axis=1)]
    weights = {"wb": rng.normal(size=(5, 4)) * 0.1, "wl": rng.normal(size=(5, 10)) * 0.1,
               "wp": rng.normal(size=(5, 2)) * 2}
    return save_graph(path, nodes, {"x": ["N", 5]},
                      {"output_0": ["N", 4], "output_1": ["N", 10], "output_2": ["N", 2]}, weights)


def features(path: Path, shape: tuple[int, ...], seed: int = 11, **extra: Any) -> Path:
    np.savez(path, x=np.random.default_rng(seed).normal(size=shape).astype(np.float32), **extra)
    return path


def run_onnx(path: Path, data: Path) -> dict[str, Any]:
    """Every output of the model at ``path`` on the data's ``x``, straight from ONNX Runtime."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.load(data)["x"]
    names = [output.name for output in session.get_outputs()]
    rows = [dict(zip(names, session.run(None, {"x": x[i:i + 1]}))) for i in range(len(x))]
    return {name: np.concatenate([row[name] for row in rows], axis=1 if row_major(rows[0][name]) else 0)
            for name in names}


def row_major(array: Any) -> bool:
    """A time-major ``[T, 1, C]`` output of one example (its batch axis is 1)."""
    return array.ndim == 3 and array.shape[1] == 1 and array.shape[0] != 1


@dataclass
class Compared:
    original: Any
    variant: Any
    metrics: dict[str, Any]


def measure_and_compare(original: Path, variant: Path, data: Path, options: dict[str, Any] | None = None,
                        labels: Any | None = None) -> Compared:
    """Measure both models with the onnx backend's runtime in this process (as the measuring
    process does), the variant with the original's decisions, and compare their outputs."""
    from types import SimpleNamespace

    from compressor.engine import measure_runtime
    from compressor.evaluation import compare_outputs, with_original_tasks
    from compressor.models import Artifact, MeasureSettings
    from compressor.npz import read_npz
    from compressor_onnx import plugin

    settings = MeasureSettings(**QUICK_SETTINGS, options=dict(options or {}))
    measured = []
    for path in (original, variant):
        artifact = Artifact("onnx", path, "onnx")
        runtime = plugin.compressor_open_runtime(artifact, settings)
        try:
            found = measure_runtime(runtime, read_npz(data, tuple(runtime.inputs)), settings)
        finally:
            runtime.close()
        measured.append(SimpleNamespace(output_info=found.outputs, kept=found.kept, metrics=found.metrics))
        settings = with_original_tasks(settings, measured[0])
    return Compared(measured[0], measured[1], compare_outputs(measured[0], measured[1], labels))
