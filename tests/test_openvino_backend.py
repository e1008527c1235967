"""The OpenVINO example plugin (examples/compressor-openvino), installed like a third party's
package: small and public-API-only, conformant on its sample, and through the CLI on ONNX
models whose compressed outputs are checked against the ONNX original run by ONNX Runtime."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from click.testing import CliRunner

from compressor.cli import cli
from compressor.plugins import get_host
from compressor.testing import check_backend

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "examples" / "compressor-openvino" / "compressor_openvino"
FEATURES, HIDDEN, CLASSES = 32, 128, 10


def invoke(*args: object) -> Any:
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def save_onnx(path: Path, nodes: list[Any], initializers: dict[str, np.ndarray], shape: list[Any],
              outputs: int) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", outputs])],
        [numpy_helper.from_array(array, name) for name, array in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def classifier(folder: Path) -> dict[str, Any]:
    """A fitted random-features classifier (32-128-10) as ONNX, labelled eval data, calibration data."""
    from onnx import helper

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(CLASSES, FEATURES))

    def examples(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, CLASSES, count)
        return (centers[labels] + 0.8 * rng.normal(size=(count, FEATURES))).astype(np.float32), labels

    train_x, train_y = examples(2000)
    w0 = (rng.normal(size=(FEATURES, HIDDEN)) / np.sqrt(FEATURES)).astype(np.float32)
    b0 = (0.1 * rng.normal(size=HIDDEN)).astype(np.float32)
    hidden = np.hstack([np.maximum(train_x @ w0 + b0, 0), np.ones((len(train_x), 1))])
    readout = np.linalg.solve(hidden.T @ hidden + 1e-2 * np.eye(HIDDEN + 1), hidden.T @ np.eye(CLASSES)[train_y])
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["m0"]), helper.make_node("Add", ["m0", "b0"], ["z0"]),
             helper.make_node("Relu", ["z0"], ["a0"]), helper.make_node("MatMul", ["a0", "W1"], ["m1"]),
             helper.make_node("Add", ["m1", "b1"], ["logits"])]
    model = save_onnx(folder / "classifier.onnx", nodes,
                      {"W0": w0, "b0": b0, "W1": readout[:-1].astype(np.float32),
                       "b1": readout[-1].astype(np.float32)}, ["batch", FEATURES], CLASSES)
    eval_x, eval_y = examples(400)
    np.savez(folder / "eval.npz", x=eval_x, y=eval_y)
    np.savez(folder / "calibration.npz", x=examples(100)[0])
    return {"model": model, "eval": folder / "eval.npz", "calibration": folder / "calibration.npz", "x": eval_x}


def attention(folder: Path) -> Path:
    """One self-attention block over 8 tokens of 16 features, mean-pooled to 4 scores."""
    from onnx import helper

    rng = np.random.default_rng(1)
    weights = {name: (rng.normal(size=(16, 16 if name != "Wo" else 4)) / 4).astype(np.float32)
               for name in ("Wq", "Wk", "Wv", "Wo")}
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"]), helper.make_node("MatMul", ["x", "Wk"], ["k"]),
             helper.make_node("MatMul", ["x", "Wv"], ["v"]),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"]),
             helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
             helper.make_node("Softmax", ["scaled"], ["weights"], axis=-1),
             helper.make_node("MatMul", ["weights", "v"], ["mixed"]),
             helper.make_node("ReduceMean", ["mixed"], ["pooled"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["pooled", "Wo"], ["logits"])]
    weights["scale"] = np.array(0.25, np.float32)
    np.savez(folder / "attention-calibration.npz", x=rng.normal(size=(32, 8, 16)).astype(np.float32))
    return save_onnx(folder / "attention.onnx", nodes, weights, ["batch", 8, 16], 4)


def external_data_outside(folder: Path) -> Path:
    """An ONNX model in ``folder/inner`` whose weights point at ``../secret.bin``."""
    from onnx import TensorProto, helper, numpy_helper

    (folder / "inner").mkdir()
    (folder / "secret.bin").write_bytes(np.ones(16, np.float32).tobytes())
    weights = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    weights.ClearField("raw_data")
    weights.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "64")):
        entry = weights.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["logits"])], "escape",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])], [weights])
    path = folder / "inner" / "escape.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


def run_openvino(artifact: Path, x: np.ndarray) -> np.ndarray:
    import openvino as ov

    compiled = ov.Core().compile_model(str(artifact), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(x)[compiled.outputs[0]]


def test_the_plugin_is_installed_small_and_written_against_the_public_api_only() -> None:
    info = next(p for p in get_host().plugins() if p.name == "openvino")
    assert (info.distribution, info.module) == ("compressor-openvino", "compressor_openvino.plugin")
    sources = sorted(PACKAGE.glob("*.py"))
    assert sum(len(path.read_text().splitlines()) for path in sources) < 250
    imports = [line.strip() for path in sources for line in path.read_text().splitlines()
               if re.match(r"\s*(from|import)\s+compressor", line)]
    assert imports and all(line.startswith("from compressor.plugin import") for line in imports), imports
    guide = (ROOT / "docs" / "writing-a-plugin.md").read_text()
    shown = [line.strip() for line in guide.splitlines() if "model.handle.model" in line or "weight_bytes(xml)" in line]
    assert shown and all(line in (PACKAGE / "plugin.py").read_text() for line in shown), shown


def test_the_plugin_conforms_on_its_sample_model(tmp_path: Path) -> None:
    (report,) = check_backend("openvino", tmp_path)
    variants = {variant.name: variant for variant in report.variants}
    assert list(variants) == ["original", "fp16", "dynamic", "int8"]
    weights = {name: variant.metadata["weight_bytes"] for name, variant in variants.items()}
    floats = weights["original"]["f32"]
    assert weights["fp16"] == {"f16": floats // 2}
    assert 0.24 < weights["dynamic"]["u8"] / floats <= 0.25 and 0.24 < weights["int8"]["i8"] / floats <= 0.25
    assert variants["fp16"].metrics["agreement"] >= 0.99
    assert variants["dynamic"].metrics["agreement"] >= 0.95 and variants["int8"].metrics["agreement"] >= 0.9
    assert {variant.metrics["inference_precision"] for variant in report.variants} == {"f32"}


def test_the_cli_compresses_onnx_and_the_outputs_agree_with_the_onnx_original(tmp_path: Path) -> None:
    import onnxruntime

    files = classifier(tmp_path)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "compressor", "run", files["model"], "--backend", "openvino", "-q", "fp16",
         "-q", "dynamic", "-q", "int8", "--data", files["eval"], "--calibration-data", files["calibration"],
         "--min-seconds", "0", "--out", out],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COMPRESSOR_LOAD_PLUGINS": "openvino"})
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    variants = {variant["name"]: variant for variant in report["variants"]}
    assert list(variants) == ["original", "fp16", "dynamic", "int8"]
    assert variants["int8"]["metadata"]["model_type"] == "generic"
    reference = onnxruntime.InferenceSession(str(files["model"])).run(None, {"x": files["x"]})[0]
    errors, sizes = {}, {}
    for name, variant in variants.items():
        artifact = out / variant["artifact"]
        logits = run_openvino(artifact, files["x"])
        errors[name] = float(np.abs(logits - reference).max())
        agreement = float((logits.argmax(1) == reference.argmax(1)).mean())
        sizes[name] = artifact.with_suffix(".bin").stat().st_size
        # The report compares with the IR of the original, which computes what ONNX Runtime does.
        assert abs(variant["metrics"]["agreement"] - agreement) <= 1 / len(reference), name
    assert variants["original"]["metrics"]["accuracy"] >= 0.95
    assert errors["original"] < 1e-4 < errors["fp16"] < 1e-2 < errors["dynamic"] < 0.1
    assert errors["int8"] < 0.5
    assert [variants[name]["metrics"]["agreement"] for name in ("fp16", "dynamic")] == [1.0, 1.0]
    assert variants["int8"]["metrics"]["agreement"] >= 0.97
    assert 1.95 < sizes["original"] / sizes["fp16"] <= 2.0
    assert sizes["original"] / sizes["dynamic"] > 3.3 and sizes["original"] / sizes["int8"] > 3.3


def test_int8_takes_the_transformer_preset_for_attention(tmp_path: Path) -> None:
    import compressor_openvino.plugin as openvino_plugin

    from compressor.plugin import Context, Dataset, Step

    loaded = openvino_plugin.compressor_load(attention(tmp_path), "openvino", Context())
    data = np.load(tmp_path / "attention-calibration.npz")["x"]
    context = Context(calibration_data=Dataset(tmp_path / "attention-calibration.npz", {"x": data}, None, len(data)))
    quantized = {chosen: openvino_plugin.compressor_compress(
        loaded, Step("quantize", {"mode": "int8", "model_type": chosen}), context) for chosen in ("auto", "generic")}
    assert [quantized[chosen].metadata["model_type"] for chosen in ("auto", "generic")] == ["transformer", "generic"]
    assert "transformer preset" in quantized["auto"].notes[-1] and "preset" not in quantized["generic"].notes[-1]
    fake_quantizers = {chosen: [op.get_type_name() for op in model.handle.model.get_ordered_ops()].count(
        "FakeQuantize") for chosen, model in quantized.items()}
    assert fake_quantizers["auto"] > 0 and fake_quantizers["auto"] != fake_quantizers["generic"], fake_quantizers
    assert loaded.notes == [] and not any(op.get_type_name() == "FakeQuantize"
                                          for op in loaded.handle.model.get_ordered_ops())


def test_onnx_stays_the_onnx_backends_and_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    model = classifier(tmp_path)["model"]
    assert get_host().identify(model) == "onnx"
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage")
    torch_file = tmp_path / "model.pt"
    torch_file.write_bytes(b"PK")
    escaping = external_data_outside(tmp_path)
    for path, code, message in ((corrupt, 4, "corrupt.onnx: "), (torch_file, 5, "export PyTorch models to ONNX"),
                                (escaping, 3, "outside the base directory")):
        result = invoke("run", path, "--backend", "openvino", "-q", "fp16", "--out", tmp_path / f"out-{code}")
        assert result.exit_code == code, result.output
        assert message in result.output and "Traceback" not in result.output
        assert not (tmp_path / f"out-{code}").exists()
