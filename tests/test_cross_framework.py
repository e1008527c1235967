"""One framework's model on another's runtime: PyTorch through ``--backend tflite``
(litert-torch, ai-edge-quantizer), Keras through ``--backend onnx`` (tf2onnx), and
``--backend onnx,tflite`` compared against one original. Real converters, no mocks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import snapshot

from compressor.cli import cli

FACTORY = "cross_twohead:build"
_FACTORY_SOURCE = '''
import torch


class TwoHead(torch.nn.Module):
    """A classifier head and a regression head over one hidden layer."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(16, 32)
        self.classes = torch.nn.Linear(32, 4)
        self.values = torch.nn.Linear(32, 2)

    def forward(self, x):
        hidden = torch.relu(self.body(x))
        return self.classes(hidden), self.values(hidden)


def build():
    return TwoHead()


class Median(torch.nn.Module):
    """An op litert-torch has no lowering for (aten.median.dim)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.linear(x) - torch.median(x, dim=1, keepdim=True).values


class Branch(Median):
    """Control flow on the input's values, which torch.export (inside litert-torch) cannot trace."""

    def forward(self, x):
        return self.linear(x) if x.sum() > 0 else -self.linear(x)


def median():
    return Median()


def branch():
    return Branch()
'''


def invoke(*args: object) -> Any:
    return CliRunner().invoke(cli, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A briefly trained two-head MLP saved as a state_dict, its factory module on sys.path."""
    import torch

    folder = tmp_path_factory.mktemp("cross")
    (folder / "cross_twohead.py").write_text(textwrap.dedent(_FACTORY_SOURCE))
    sys.path.insert(0, str(folder))
    try:
        import cross_twohead

        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(96, 16)).astype(np.float32)
        labels = (x[:, :4] * [1.0, -1.0, 0.5, 2.0]).argmax(1)
        model = cross_twohead.build()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(60):
            classes, values = model(torch.from_numpy(x))
            loss = torch.nn.functional.cross_entropy(classes, torch.from_numpy(labels)) + \
                torch.nn.functional.mse_loss(values, torch.from_numpy(x[:, 4:6]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        torch.save(model.state_dict(), folder / "twohead.pt")
        np.savez(folder / "eval.npz", x=x[:48], y=labels[:48])
        np.savez(folder / "calib.npz", x=x[48:])
        with torch.no_grad():
            expected = [tensor.numpy() for tensor in model(torch.from_numpy(x[:48]))]
        yield {"model": folder / "twohead.pt", "eval": folder / "eval.npz", "calib": folder / "calib.npz",
               "x": x[:48], "expected": expected, "folder": folder}
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("cross_twohead", None)


@pytest.fixture(scope="module")
def both_runtimes(torch_files: dict[str, Any]) -> Path:
    """One ``--backend onnx,tflite`` run (dynamic, int8) shared by the tests below:
    the PyTorch model is converted once per backend."""
    out = torch_files["folder"] / "out"
    result = invoke("run", torch_files["model"], "--set", f"model_factory={FACTORY}", "--backend", "onnx,tflite",
                    "-q", "dynamic", "-q", "int8", "--data", torch_files["eval"],
                    "--calibration-data", torch_files["calib"], "--min-seconds", "0", "-o", out)
    assert result.exit_code == 0, result.output
    return out


def tflite_outputs(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of a .tflite on ``x``, one example at a time (its batch is fixed to 1)."""
    from compressor_tflite.runtime import open_runtime

    runtime = open_runtime(path, 1)
    rows = [runtime.run({"x": x[index : index + 1]}) for index in range(len(x))]
    return {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}


@pytest.mark.parametrize(("variant", "tolerance", "agreement"),
                         [("original", 1e-5, 1.0), ("dynamic", 0.01, 0.97), ("int8", 0.03, 0.95)])
def test_pytorch_on_tflite_answers_like_torch(both_runtimes: Path, torch_files: dict[str, Any], variant: str,
                                              tolerance: float, agreement: float) -> None:
    outputs = tflite_outputs(both_runtimes / "tflite" / f"{variant}.tflite", torch_files["x"])
    classes, values = torch_files["expected"]
    assert sorted(outputs) == ["output_0", "output_1"]  # both heads, named as on the onnx backend
    scale = max(np.abs(classes).max(), np.abs(values).max())
    # Mean, not max: int8 clips the few eval inputs beyond the calibration data's range.
    assert np.abs(outputs["output_0"] - classes).mean() <= tolerance * scale
    assert np.abs(outputs["output_1"] - values).mean() <= tolerance * scale
    assert (outputs["output_0"].argmax(1) == classes.argmax(1)).mean() >= agreement


def test_onnx_and_tflite_are_compared_against_one_original(both_runtimes: Path) -> None:
    merged = json.loads((both_runtimes / "report.json").read_text())
    names = [variant["name"] for variant in merged["variants"]]
    assert names == ["onnx:original", "onnx:dynamic", "onnx:int8",
                     "tflite:original", "tflite:dynamic", "tflite:int8"]
    assert merged["settings"]["reference"] == "onnx:original"
    by_name = {variant["name"]: variant for variant in merged["variants"]}
    converted = by_name["tflite:original"]
    assert converted["metrics"]["reference"] == "onnx:original"
    assert converted["metrics"]["agreement"] == 1.0 and converted["metrics"]["cosine"]["min"] > 0.9999
    assert converted["metadata"]["converter"].startswith("litert-torch")
    assert by_name["tflite:int8"]["metadata"]["recipe"] == "static_wi8_ai8"
    assert by_name["tflite:int8"]["metrics"]["agreement"] >= 0.95
    assert (both_runtimes / "tflite" / "int8.tflite").is_file() and (both_runtimes / "onnx" / "int8.onnx").is_file()


@pytest.mark.parametrize(("step", "message"), [
    (["-q", "uint8"], "quantize uint8 of a PyTorch model on backend 'tflite'"),
    (["--prune", "0.5"], "'prune 0.5' is not available for a PyTorch model on backend 'tflite'"),
])
def test_what_litert_cannot_do_for_pytorch_is_refused(torch_files: dict[str, Any], tmp_path: Path,
                                                      step: list[str], message: str) -> None:
    out = tmp_path / "out"
    result = invoke("run", torch_files["model"], "--set", f"model_factory={FACTORY}", "--backend", "tflite",
                    *step, "--calibration-data", torch_files["calib"], "--train-data", torch_files["eval"],
                    "-o", out)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not out.exists()


def test_a_state_dict_without_its_factory_is_refused_on_tflite(torch_files: dict[str, Any], tmp_path: Path) -> None:
    result = invoke("run", torch_files["model"], "--backend", "tflite", "-q", "dynamic", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "--set model_factory=" in result.stderr


def check_refused(model: Path, message: str, out: Path, scratch: Path, *args: object) -> str:
    """A conversion the converter refuses: exit 7 in one line naming the file and the converter's
    reason, no traceback, nothing at ``out`` or in $TMPDIR, the input folder unchanged."""
    before = snapshot(model.parent)
    result = invoke("run", model, *args, "-o", out)
    assert result.exit_code == 7, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"{model}: " in lines[0], result.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists() and list(scratch.iterdir()) == []
    assert snapshot(model.parent) == before
    return lines[0]


@pytest.mark.parametrize(("factory", "reason"), [
    ("median", "(RuntimeError: Lowering not found: aten.median.dim)"),
    ("branch", "(GuardOnDataDependentSymNode: Could not guard on data-dependent expression"),
])
def test_a_pytorch_model_litert_cannot_convert_is_one_line(torch_files: dict[str, Any], tmp_path: Path,
                                                          private_tmpdir: Path, factory: str, reason: str) -> None:
    import cross_twohead
    import torch

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    model = inputs / f"{factory}.pt"
    torch.save(getattr(cross_twohead, factory)().state_dict(), model)
    np.savez(inputs / "eval.npz", x=torch_files["x"][:4])
    line = check_refused(model, f"litert-torch cannot convert this model {reason}", tmp_path / "out",
                         private_tmpdir, "--set", f"model_factory=cross_twohead:{factory}", "--backend", "tflite",
                         "-q", "dynamic", "--data", inputs / "eval.npz")
    assert line.endswith("; use --backend onnx or torch")


def test_a_keras_model_tf2onnx_cannot_convert_is_one_line(tmp_path: Path, private_tmpdir: Path) -> None:
    """tf2onnx has no handler for Bucketize (Keras' Discretization layer); its Python API
    only logs that and leaves the TensorFlow op in the graph."""
    from compressor_frontends.keras import frameworks

    keras = frameworks.keras()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    x = keras.Input((8,), name="x")
    bins = keras.layers.Discretization(bin_boundaries=[0.25, 0.5, 0.75], name="bins")(x)
    hidden = keras.layers.Flatten()(keras.layers.Embedding(4, 2)(bins))
    model = inputs / "bucketize.keras"
    keras.Model(x, keras.layers.Dense(3)(hidden), name="bucketizer").save(model)
    check_refused(model, "tf2onnx cannot convert this model (TensorFlow op not supported: Bucketize (at "
                  "bucketizer/bins/Bucketize)); use --backend tflite", tmp_path / "out", private_tmpdir,
                  "--backend", "onnx", "-q", "dynamic")


def _keras_model(folder: Path, lambda_layer: bool = False) -> tuple[Path, np.ndarray, np.ndarray]:
    from compressor_frontends.keras import frameworks

    keras = frameworks.keras()
    keras.utils.set_random_seed(0)
    image = keras.Input((8, 8, 1), name="image")
    hidden = keras.layers.Conv2D(4, 3, activation="relu")(image)
    if lambda_layer:
        hidden = keras.layers.Lambda(lambda tensor: tensor * 2)(hidden)
    hidden = keras.layers.Flatten()(hidden)
    model = keras.Model(image, keras.layers.Dense(10, name="logits")(hidden))
    x = np.random.default_rng(1).random((24, 8, 8, 1)).astype(np.float32)
    path = folder / ("lambda.keras" if lambda_layer else "cnn.keras")
    model.save(path)
    return path, x, model(x).numpy()


def test_keras_on_onnx_runtime(tmp_path: Path) -> None:
    import onnxruntime

    path, x, expected = _keras_model(tmp_path)
    np.savez(tmp_path / "eval.npz", image=x)
    out = tmp_path / "out"
    result = invoke("run", path, "--backend", "onnx", "-q", "dynamic", "--data", tmp_path / "eval.npz",
                    "--min-seconds", "0", "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [v["name"] for v in report["variants"]] == ["original", "dynamic"]
    assert report["variants"][1]["metrics"]["cosine"]["min"] > 0.99
    for name, tolerance in (("original", 1e-4), ("dynamic", 0.05)):
        session = onnxruntime.InferenceSession(str(out / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        (answer,) = session.run(None, {"image": x})
        assert np.abs(answer - expected).max() <= tolerance * np.abs(expected).max()


def test_keras_safety_checks_still_apply_on_onnx(tmp_path: Path) -> None:
    path, _, _ = _keras_model(tmp_path, lambda_layer=True)
    result = invoke("run", path, "--backend", "onnx", "-q", "dynamic", "-o", tmp_path / "out")
    assert result.exit_code != 0 and "Lambda layer" in result.stderr and "--trust" in result.stderr
    assert not (tmp_path / "out").exists()


def test_each_backend_still_claims_only_its_own_files(torch_files: dict[str, Any], tmp_path: Path) -> None:
    from compressor.plugins import PluginHost

    host = PluginHost()
    (tmp_path / "m.keras").write_bytes(b"PK\x03\x04")
    assert host.identify(torch_files["model"]) == "onnx"
    assert host.identify(tmp_path / "m.keras") == "tflite"


def test_import_compressor_and_its_plugins_imports_no_framework() -> None:
    code = ("import sys, compressor, compressor_onnx.plugin, compressor_tflite.plugin, "
            "compressor_tflite.from_torch, compressor_onnx.from_keras\n"
            "print([m for m in ('torch', 'tensorflow', 'litert_torch', 'tf2onnx', 'jax', 'onnx', "
            "'ai_edge_quantizer') if m in sys.modules])")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"
