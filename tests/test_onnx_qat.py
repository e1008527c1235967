"""``qat`` on the onnx backend, with real torch, onnx and ONNX Runtime: the saved graph is
QDQ with int8 weights that ONNX Runtime runs as integer kernels, it keeps the float
model's accuracy, it chains after ``prune`` (keeping the zeros) and ``distill``, works on
Conv and transformers models, and bad requests are refused with one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, numpy_helper
from onnx_fixtures import FACTORY, DigitsFiles, compress_with, make_digits_files

from compressor import Model
from compressor.cli import cli
from compressor_onnx import plugin

FAST = ["--min-seconds", "0"]
#: Integer kernels ONNX Runtime fuses QDQ groups into on CPU.
INTEGER_OPS = {"QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "QLinearConv", "MatMulInteger"}
MODELS = """
import torch

class Cnn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.mix = torch.nn.Conv1d(8, 8, 3, padding=1)
        self.token = torch.nn.Linear(8, 16)
        self.head = torch.nn.Linear(16 * 64, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x.reshape(-1, 1, 8, 8)))
        h = torch.relu(self.mix(h.flatten(2)))
        h = torch.relu(self.token(h.transpose(1, 2)))  # a Linear on 3-D input: MatMul + Add
        return self.head(h.flatten(1))

class Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(64))

    def forward(self, x):
        return (x * self.weight)[:, :10]

def cnn():
    return Cnn()

def scale():
    return Scale()

def student():
    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
"""


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(arg) for arg in args])
    return result.exit_code, result.output


def compress(path: Path, steps: list[str], folder: Path, factory: str = FACTORY, **data: Path) -> tuple[Model, Path]:
    """Load ``path`` like the CLI does, apply ``steps``, save: the model and the saved file."""
    model, artifact = compress_with(plugin, "onnx", path, steps, folder, {"model_factory": factory}, **data)
    return model, artifact.path


def accuracy(path: Path, digits: DigitsFiles) -> float:
    import onnxruntime as ort

    data = np.load(digits.eval)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: data["x"]})[0]
    return float((logits.argmax(1) == data["y"]).mean())


def int8_weights(path: Path) -> dict[str, Any]:
    """Each MatMul/Gemm/Conv weight as the int8 array its DequantizeLinear reads; asserts
    that every weight is one and every activation input went through QuantizeLinear."""
    graph = onnx.load(str(path)).graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    weights = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        activation, weight = (producers[name] for name in node.input[:2])
        assert weight.op_type == "DequantizeLinear" and activation.op_type == "DequantizeLinear", node.name
        assert initializers[weight.input[0]].data_type == TensorProto.INT8
        assert producers[activation.input[0]].op_type == "QuantizeLinear"
        weights[weight.input[0]] = numpy_helper.to_array(initializers[weight.input[0]])
    assert not [t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) >= 2]
    return weights


def integer_kernels(path: Path, folder: Path) -> set[str]:
    """The op types of ``path`` as ONNX Runtime optimized it for this CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return {node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node} & INTEGER_OPS


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsFiles:
    from compressor_onnx.samples import digits_split

    files = make_digits_files(tmp_path_factory.mktemp("digits"))
    split = digits_split()
    np.savez(files.folder / "train.npz", x=split.train_x, y=split.train_y)
    np.savez(files.folder / "unlabelled.npz", x=split.train_x[:256])
    (files.folder / "qat_models_h21.py").write_text(MODELS)
    return files


def test_qat_saves_an_int8_qdq_graph_as_accurate_as_the_float_model(digits: DigitsFiles, tmp_path: Path) -> None:
    steps = tmp_path / "recipe.toml"
    steps.write_text('[variants.qat]\nsteps = ["qat epochs=2"]\n[variants.ptq]\nsteps = ["quantize int8"]\n')
    code, output = invoke("run", digits.state_dict, "--recipe", steps, "--train-data", digits.folder / "train.npz",
                          "--calibration-data", digits.calibration, "--data", digits.eval,
                          "--set", f"model_factory={FACTORY}", "-o", tmp_path / "out", *FAST)
    assert code == 0, output
    report = {v["name"]: v for v in json.loads((tmp_path / "out" / "report.json").read_text())["variants"]}
    variant = report["qat"]
    facts = variant["metadata"]["qat"]
    assert (facts["epochs"], facts["labels"], facts["layers"]) == (2, True, 2)
    assert variant["metadata"]["quantization"] == ["qat epochs=2"]
    assert "quantization-aware training: 2 epoch(s) on 1347 examples" in variant["notes"][-1]
    saved = tmp_path / "out" / variant["artifact"]
    weights = int8_weights(saved)
    assert sorted(array.shape for array in weights.values()) == [(10, 64), (64, 64)]
    # Weights and biases: int8 and int32 instead of float32, plus one scale per channel.
    graph = onnx.load(str(saved)).graph
    stored = sum(numpy_helper.to_array(t).nbytes for t in graph.initializer)
    assert stored < 0.35 * sum(p.numel() * 4 for p in digits.module.parameters())
    assert integer_kernels(saved, tmp_path) >= {"QGemm"}
    assert accuracy(saved, digits) >= digits.accuracy - 0.02
    assert accuracy(saved, digits) >= accuracy(tmp_path / "out" / report["ptq"]["artifact"], digits) - 0.02


def test_qat_of_a_conv_net_and_without_labels(digits: DigitsFiles, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.syspath_prepend(str(digits.folder))
    import qat_models_h21

    train = np.load(digits.folder / "train.npz")
    torch.manual_seed(0)
    cnn = qat_models_h21.cnn()
    optimizer = torch.optim.Adam(cnn.parameters(), lr=3e-3)
    x, y = torch.from_numpy(train["x"]), torch.from_numpy(train["y"])
    for _ in range(3):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(cnn(x[batch]), y[batch]).backward()
            optimizer.step()
    weights_file = tmp_path / "cnn.pt"
    torch.save(cnn.state_dict(), weights_file)
    test = np.load(digits.eval)
    with torch.no_grad():
        float_accuracy = float((cnn.eval()(torch.from_numpy(test["x"])).argmax(1).numpy() == test["y"]).mean())
    model, saved = compress(weights_file, ["qat epochs=1"], tmp_path, "qat_models_h21:cnn",
                            train=digits.folder / "unlabelled.npz")
    assert "against the float model's outputs (no labels y)" in model.notes[-1]
    assert model.metadata["qat"]["labels"] is False
    # Conv2d, Conv1d, the 3-D Linear's MatMul (its transpose folded into the int8 weight) and the head.
    assert sorted(array.shape for array in int8_weights(saved).values()) == [(8, 1, 3, 3), (8, 8, 3), (8, 16),
                                                                             (10, 1024)]
    assert {"QLinearConv", "QGemm"} <= integer_kernels(saved, tmp_path)
    assert accuracy(saved, digits) >= float_accuracy - 0.03


def test_qat_after_prune_keeps_the_zeros_and_after_distill_trains_the_student(
        digits: DigitsFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, saved = compress(digits.state_dict, ["prune 0.5 epochs=0", "qat epochs=1"], tmp_path,
                            train=digits.folder / "train.npz")
    facts = model.metadata["qat"]
    assert facts["weights_from_graph"] == 2 and facts["sparsity_before"] == facts["sparsity_after"] == 0.5
    assert all(abs(float((array == 0).mean()) - 0.5) < 0.01 for array in int8_weights(saved).values())
    assert accuracy(saved, digits) >= digits.accuracy - 0.05
    monkeypatch.syspath_prepend(str(digits.folder))
    model, saved = compress(digits.state_dict, ["distill student=qat_models_h21:student epochs=1", "qat epochs=1"],
                            tmp_path, train=digits.folder / "train.npz")
    assert sorted(array.shape for array in int8_weights(saved).values()) == [(10, 16), (16, 64)]
    assert model.metadata["quantization"] == ["qat epochs=1"] and "distillation" in model.metadata


def test_qat_of_a_transformers_classifier_quantizes_its_linear_layers(tmp_path: Path) -> None:
    import onnxruntime as ort
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    folder = tmp_path / "bert"
    transformers.BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(0)
    arrays = {"input_ids": rng.integers(5, 120, size=(16, 12)), "attention_mask": np.ones((16, 12), np.int64)}
    np.savez(tmp_path / "train.npz", **arrays, y=rng.integers(0, 3, size=16))
    model, saved = compress(folder, ["qat epochs=1"], tmp_path, train=tmp_path / "train.npz")
    # Q, K, V, attention output and the feed-forward pair of two layers, the pooler and the classifier.
    assert model.metadata["qat"]["layers"] == 14
    graph = onnx.load(str(saved)).graph
    int8 = [t for t in graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8) == 14
    float_matrices = [t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2]
    assert all("embeddings" in name for name in float_matrices)
    session = ort.InferenceSession(str(saved), providers=["CPUExecutionProvider"])
    assert session.run(None, {i.name: arrays[i.name] for i in session.get_inputs()})[0].shape == (16, 3)


@pytest.fixture(scope="module")
def scale_model(digits: DigitsFiles) -> Path:
    """A state_dict of a model with no Linear or Conv layer."""
    import torch

    path = digits.folder / "scale.pt"
    torch.save({"weight": torch.ones(64)}, path)
    return path


@pytest.mark.parametrize("model,steps,train,message", [
    ("mlp", ["qat"], False, "'qat' needs --train-data on backend 'onnx'"),
    ("onnx", ["qat"], True, "needs the PyTorch or transformers model; digits.onnx is read as an ONNX graph"),
    ("scale", ["qat"], True, "scale.pt has no nn.Linear or nn.Conv1d/2d layer to quantize"),
    ("mlp", ["quantize dynamic", "qat"], True, "'qat' cannot follow 'quantize dynamic': the model is quantized"),
    ("mlp", ["lowrank rank=8 epochs=0", "qat"], True, "'qat' can follow only an unstructured prune among the graph steps"),
    ("mlp", ["qat epochs=1", "quantize dynamic"], True, "'quantize dynamic' cannot follow qat"),
    ("mlp", ["qat epochs=1", "prune 0.5"], True, "'prune 0.5' cannot follow qat"),
])
def test_bad_requests_exit_2_with_one_line(digits: DigitsFiles, scale_model: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, model: str, steps: list[str],
                                           train: bool, message: str) -> None:
    monkeypatch.syspath_prepend(str(digits.folder))
    path = {"mlp": digits.state_dict, "onnx": digits.onnx, "scale": scale_model}[model]
    factory = "qat_models_h21:scale" if model == "scale" else FACTORY
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f"[variants.v]\nsteps = {json.dumps(steps)}\n")
    data = ["--train-data", digits.folder / "unlabelled.npz"] if train else []
    code, output = invoke("run", path, "--recipe", recipe, *data, "--calibration-data", digits.calibration,
                          "--set", f"model_factory={factory}", "-o", tmp_path / "out", *FAST)
    assert code == 2, output
    assert message in output and len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / "out").exists()
