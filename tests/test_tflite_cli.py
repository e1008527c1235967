"""The tflite backend from the command line, and its handling of unsafe and broken files."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from tflite_fixtures import (
    KerasFiles,
    corrupt_variants,
    environment_without_legacy_keras,
    lambda_model_files,
    shared_digits_files,
)

from compressor import Context, InvalidInputError, UnsafeInputError
from compressor.cli import cli
from compressor.recipes import load_recipe
from compressor_tflite import plugin

RECIPE = Path(__file__).resolve().parent.parent / "examples" / "recipes" / "pruning-study.toml"
FAST = ["--min-seconds", "0"]


@pytest.fixture(scope="module")
def files() -> KerasFiles:
    return shared_digits_files()


@pytest.fixture(scope="module")
def lambda_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return lambda_model_files(tmp_path_factory.mktemp("lambda"))


@pytest.fixture(scope="module")
def fp32_tflite(files: KerasFiles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = plugin.compressor_load(files.keras, "tflite", Context())
    folder = tmp_path_factory.mktemp("fp32")
    return plugin.compressor_save(model, folder / "cnn", Context()).path


def invoke(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(arg) for arg in args])
    return result.exit_code, result.stdout, result.stderr


def report(folder: Path) -> dict[str, dict]:
    document = json.loads((folder / "report.json").read_text())
    return {variant["name"]: variant for variant in document["variants"]}


@pytest.mark.parametrize("which", [0, 1], ids=["keras", "h5"])
def test_lambda_layer_needs_trust(lambda_files: tuple[Path, Path], which: int) -> None:
    path = lambda_files[which]
    with pytest.raises(UnsafeInputError, match=r"Lambda layer \('double'\).*--trust"):
        plugin.compressor_load(path, "tflite", Context())
    model = plugin.compressor_load(path, "tflite", Context(trust=True))
    assert "double" in [layer.name for layer in model.handle.keras_model.layers]


def test_lambda_refused_from_the_cli(lambda_files: tuple[Path, Path], tmp_path: Path) -> None:
    code, _, stderr = invoke("run", lambda_files[0], "-q", "fp16", "-o", tmp_path / "out")
    assert code == 3
    assert stderr.count("\n") == 1 and "--trust" in stderr
    assert not (tmp_path / "out").exists()


def test_lambda_in_a_saved_model_needs_trust(lambda_files: tuple[Path, Path], tmp_path: Path) -> None:
    model = plugin.compressor_load(lambda_files[0], "tflite", Context(trust=True))
    model.handle.keras_model.save(tmp_path / "saved")
    with pytest.raises(UnsafeInputError, match="Lambda"):
        plugin.compressor_load(tmp_path / "saved", "tflite", Context())
    assert plugin.compressor_load(tmp_path / "saved", "tflite", Context(trust=True)).format == "saved_model"


def test_custom_class_needs_trust(files: KerasFiles, tmp_path: Path) -> None:
    with zipfile.ZipFile(files.keras) as source:
        members = {name: source.read(name) for name in source.namelist()}
    config = json.loads(members["config.json"])
    dense = config["config"]["layers"][-1]
    dense.update(module="evil_package.layers", class_name="Backdoor")
    members["config.json"] = json.dumps(config).encode()
    path = tmp_path / "custom.keras"
    with zipfile.ZipFile(path, "w") as target:
        for name, content in members.items():
            target.writestr(name, content)
    with pytest.raises(UnsafeInputError, match="custom class 'Backdoor'.*--trust"):
        plugin.compressor_load(path, "tflite", Context())
    with pytest.raises(InvalidInputError, match="cannot load the Keras model"):
        plugin.compressor_load(path, "tflite", Context(trust=True))


@pytest.mark.parametrize("kind", ["empty", "truncated", "random"])
@pytest.mark.parametrize("fmt", ["keras", "h5", "tflite"])
def test_broken_files_are_invalid_input(
    files: KerasFiles, fp32_tflite: Path, tmp_path: Path, fmt: str, kind: str
) -> None:
    source = {"keras": files.keras, "h5": files.h5, "tflite": fp32_tflite}[fmt]
    broken = corrupt_variants(source, tmp_path)[kind]
    with pytest.raises(InvalidInputError) as raised:
        plugin.compressor_load(broken, "tflite", Context())
    assert "\n" not in str(raised.value)
    assert raised.value.path == broken


def test_broken_file_from_the_cli(files: KerasFiles, tmp_path: Path) -> None:
    broken = corrupt_variants(files.h5, tmp_path / "broken")["truncated"]
    code, _, stderr = invoke("run", broken, "-q", "dynamic", "-o", tmp_path / "out")
    assert code == 4
    assert stderr.startswith("error: ") and stderr.count("\n") == 1
    assert "Traceback" not in stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("source", "suffix", "message"),
    [
        ("h5", ".keras", r"\.keras suffix but is a Keras HDF5 file"),
        ("keras", ".h5", r"\.h5 suffix but is a Keras v3 archive"),
        ("keras", ".tflite", r"\.tflite suffix but is a Keras v3 archive"),
        ("tflite", ".keras", r"\.keras suffix but is a TFLite flatbuffer"),
    ],
)
def test_lying_extension(
    files: KerasFiles, fp32_tflite: Path, tmp_path: Path, source: str, suffix: str, message: str
) -> None:
    original = {"keras": files.keras, "h5": files.h5, "tflite": fp32_tflite}[source]
    liar = tmp_path / f"model{suffix}"
    liar.write_bytes(original.read_bytes())
    with pytest.raises(InvalidInputError, match=message):
        plugin.compressor_load(liar, "tflite", Context())


def test_cli_run_uint8(files: KerasFiles, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = invoke(
        "run", files.keras, "-q", "uint8",
        "--calibration-data", files.calibration, "--data", files.eval, "-o", out, *FAST,
    )
    assert code == 0, stderr
    variants = report(out)
    assert list(variants) == ["original", "uint8"]
    assert variants["original"]["artifact"] == "original.tflite"
    metrics = variants["uint8"]["metrics"]
    assert metrics["agreement"] > 0.95
    assert metrics["size_bytes"] < 0.4 * variants["original"]["metrics"]["size_bytes"]
    assert variants["uint8"]["metrics"]["input_dtypes"] == "uint8"
    assert "uint8" in stdout


def test_int8_without_calibration_data_is_refused(files: KerasFiles, tmp_path: Path) -> None:
    code, _, stderr = invoke("run", files.keras, "-q", "int8", "-o", tmp_path / "out")
    assert code == 2 and "--calibration-data" in stderr


def test_measure_a_tflite_file(fp32_tflite: Path, files: KerasFiles) -> None:
    code, stdout, stderr = invoke("measure", fp32_tflite, "--data", files.eval, *FAST)
    assert code == 0, stderr
    assert "original" in stdout and "%" in stdout


def test_pruning_study_recipe(files: KerasFiles, tmp_path: Path) -> None:
    full = [variant.name for variant in load_recipe(RECIPE)]
    assert full[:8] == [f"prune-{s}" for s in ("0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8")]
    assert full[8:] == ["int8", "sparse-int8", "sparse-fp16"]
    reduced = tmp_path / "study.toml"
    text = RECIPE.read_text()
    sweep = "[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]"
    assert sweep in text
    reduced.write_text(text.replace(sweep, "[0.5]"))
    out = tmp_path / "study"
    code, _, stderr = invoke(
        "run", files.keras, "--recipe", reduced, "--set", "epochs=1",
        "--train-data", files.train, "--calibration-data", files.calibration,
        "--data", files.eval, "--max-examples", "200", "-o", out, *FAST,
    )
    assert code == 0, stderr
    variants = report(out)
    assert list(variants) == ["original", "prune-0.5", "int8", "sparse-int8", "sparse-fp16"]
    assert variants["prune-0.5"]["metadata"]["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert variants["sparse-int8"]["metadata"]["sparsity"] == pytest.approx(0.8, abs=0.02)
    assert "1 epoch(s) of fine-tuning" in variants["sparse-fp16"]["notes"][0]
    gzip = {name: variant["metrics"]["size_gzip_bytes"] for name, variant in variants.items()}
    assert gzip["sparse-int8"] < gzip["int8"] < gzip["original"]
    assert variants["sparse-int8"]["metrics"]["accuracy"] > 0.7


def test_real_subprocess_without_legacy_keras_variable(files: KerasFiles, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "compressor", "run", str(files.keras), "--prune", "0.5",
         "-q", "int8", "--calibration-data", str(files.calibration), "--data", str(files.eval),
         "-o", str(out), "--min-seconds", "0"],
        capture_output=True, text=True, env=environment_without_legacy_keras(), timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    variant = report(out)["prune0.5-int8"]
    assert "one-shot" in variant["notes"][0]
    assert variant["metadata"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert (out / variant["artifact"]).is_file()
