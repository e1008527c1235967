"""Small real models and data for the onnx backend's tests, built in seconds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FACTORY = "compressor_onnx.samples:build_digits_mlp"


@dataclass(frozen=True)
class DigitsFiles:
    folder: Path
    state_dict: Path
    onnx: Path
    eval: Path
    calibration: Path
    accuracy: float
    module: Any


def make_digits_files(folder: Path) -> DigitsFiles:
    """A digits MLP as a state_dict and as plain ONNX, with eval and calibration data."""
    import torch

    from compressor_onnx.samples import digits_split, train_digits_mlp

    folder.mkdir(parents=True, exist_ok=True)
    split = digits_split()
    module = train_digits_mlp(split, epochs=25)
    state_dict = folder / "digits.pt"
    torch.save(module.state_dict(), state_dict)
    onnx_path = folder / "digits.onnx"
    torch.onnx.export(
        module, (torch.from_numpy(split.test_x[:1]),), str(onnx_path), input_names=["x"],
        output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17, dynamo=False,
    )
    eval_path, calibration = folder / "eval.npz", folder / "calibration.npz"
    np.savez(eval_path, x=split.test_x, y=split.test_y)
    np.savez(calibration, x=split.train_x[:128])
    with torch.no_grad():
        accuracy = float((module(torch.from_numpy(split.test_x)).argmax(1).numpy() == split.test_y).mean())
    return DigitsFiles(folder, state_dict, onnx_path, eval_path, calibration, accuracy, module)


@dataclass(frozen=True)
class EncoderFiles:
    folder: Path
    eval: Path
    hidden_size: int


def make_tiny_bert(folder: Path) -> EncoderFiles:
    """A randomly initialised two-layer BERT saved like a Hugging Face folder, plus
    token data with padding (so mean pooling has a mask to respect)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    model = transformers.BertModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(0)
    rows, length = 24, 16
    input_ids = rng.integers(5, 120, size=(rows, length)).astype(np.int64)
    lengths = rng.integers(4, length + 1, size=rows)
    attention_mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    input_ids[attention_mask == 0] = 0
    eval_path = folder.parent / f"{folder.name}-eval.npz"
    np.savez(eval_path, input_ids=input_ids, attention_mask=attention_mask,
             token_type_ids=np.zeros_like(input_ids))
    return EncoderFiles(folder, eval_path, config.hidden_size)


def tiny_onnx_with_external_data(folder: Path) -> Path:
    """A one-MatMul ONNX model whose weight sits in ``weights.bin`` next to it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    weight = numpy_helper.from_array(np.arange(32, dtype=np.float32).reshape(8, 4), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "tiny.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    return path


def set_external_location(path: Path, location: str) -> None:
    """Point every external tensor of the model at ``location`` (to forge bad files)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())


def write_external_mlp(folder: Path, widths: tuple[int, ...] = (32, 48, 40, 10), rows: int = 64,
                       seed: int = 0) -> tuple[Path, Path]:
    """An MLP saved with its weights in one external data file, and eval data for it.

    Layers alternate MatMul + Relu and Gemm (transB, with bias) + Relu, the two
    forms exporters write for Linear layers; returns the model and ``eval.npz``.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    nodes, initializers, current = [], [], "x"
    for index, (inner, outer) in enumerate(zip(widths, widths[1:])):
        weight = (rng.standard_normal((inner, outer)) / np.sqrt(inner)).astype(np.float32)
        output = "logits" if index == len(widths) - 2 else f"h{index}"
        if index % 2:
            initializers += [numpy_helper.from_array(np.ascontiguousarray(weight.T), f"w{index}"),
                             numpy_helper.from_array(rng.standard_normal(outer).astype(np.float32) * 0.1,
                                                     f"b{index}")]
            nodes.append(helper.make_node("Gemm", [current, f"w{index}", f"b{index}"], [f"z{index}"],
                                          name=f"gemm{index}", transB=1))
        else:
            initializers.append(numpy_helper.from_array(weight, f"w{index}"))
            nodes.append(helper.make_node("MatMul", [current, f"w{index}"], [f"z{index}"], name=f"matmul{index}"))
        if output == "logits":
            nodes[-1].output[0] = output
        else:
            nodes.append(helper.make_node("Relu", [f"z{index}"], [output], name=f"relu{index}"))
        current = output
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", widths[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", widths[-1]])], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "mlp.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="mlp.onnx.data",
                    size_threshold=0)
    x = rng.standard_normal((rows, widths[0])).astype(np.float32)
    eval_path = folder / "eval.npz"
    np.savez(eval_path, x=x)
    return path, eval_path


@dataclass(frozen=True)
class Measured:
    """What core's engine found for one artifact, measured in this process (tests only)."""

    metrics: dict[str, Any]
    outputs: dict[str, dict[str, Any]]
    kept: dict[str, dict[str, Any]]

    @property
    def predictions(self) -> Any:
        """Top-1 of the first output (a classifier's classes)."""
        return next(iter(self.kept.values()))["top1"]


def measure_here(artifact: Any, data: Any, settings: Any) -> Measured:
    """Open the artifact's onnx runtime and let core measure it, as the measuring process does."""
    from compressor.engine import measure_runtime
    from compressor_onnx import plugin

    runtime = plugin.compressor_open_runtime(artifact, settings)
    measured = measure_runtime(runtime, data, settings)
    return Measured(measured.metrics, measured.outputs, measured.kept)


def compress_with(plugin: Any, name: str, path: Path, steps: list[str], folder: Path,
                  options: dict[str, Any] | None = None, **data: Path) -> tuple[Any, Any]:
    """Load ``path`` with backend ``name`` (its plugin module) like the CLI does, fork,
    apply ``steps`` (recipe strings), save into ``folder``: the model and the Artifact.
    ``data``: ``train=``, ``calibration=``, ``eval=`` .npz files."""
    from compressor import Context
    from compressor.builtin import read_npz
    from compressor.recipes import parse_step
    from compressor.validation import validate_step

    backend = plugin.backend()
    folder.mkdir(parents=True, exist_ok=True)
    context = Context(options={**{k: p.default for k, p in backend.options.items()}, **(options or {})},
                      workdir=folder)
    model = plugin.compressor_load(path, name, context)
    for purpose, file in data.items():
        setattr(context, f"{purpose}_data", read_npz(file, model.inputs))
    model = plugin.compressor_fork(model, context)
    for text in steps:
        model = plugin.compressor_compress(model, validate_step(backend, parse_step(text)), context)
    return model, plugin.compressor_save(model, folder / "saved", context)
