"""The tflite backend from the command line, and its handling of unsafe and broken files."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import snapshot
from tflite_fixtures import (
    KerasFiles,
    corrupt_variants,
    dense_model_files,
    edit_keras_weights,
    edit_tflite,
    environment_without_legacy_keras,
    kernel_path,
    lambda_model_files,
    rewrite_keras_archive,
    shared_digits_files,
    two_head_files,
)

from compressor import Context, InvalidInputError, UnsafeInputError
from compressor.cli import cli
from compressor.recipes import load_recipe
from compressor_frontends.keras import hdf5
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
    (name,) = metrics["outputs"]
    assert metrics["compared_output"] == name and metrics["task"] == "classifier"
    entry = metrics["outputs"][name]
    assert entry["task"] == "classifier" and entry["shape"] == [10]
    assert entry["agreement"] == metrics["agreement"] > 0.95
    assert entry["accuracy"] == metrics["accuracy"] > 0.8
    assert metrics["cosine"]["mean"] > 0.99
    assert metrics["size_bytes"] < 0.4 * variants["original"]["metrics"]["size_bytes"]
    assert metrics["input_dtypes"] == "uint8" and metrics["runtime"] == "ai-edge-litert"
    assert metrics["eval_batch"] == 1 and metrics["load_ms"] > 0
    assert metrics["latency_batch_ms"]["throughput_per_s"] > 0
    assert metrics["peak_rss_batch_bytes"] >= metrics["peak_rss_bytes"] > 0
    assert "uint8" in stdout


@pytest.mark.parametrize("mode", ["int8", "int16x8"])
def test_full_integer_without_calibration_data_is_refused(files: KerasFiles, tmp_path: Path, mode: str) -> None:
    code, _, stderr = invoke("run", files.keras, "-q", mode, "-o", tmp_path / "out")
    assert code == 2 and "--calibration-data" in stderr


def test_two_heads_reach_the_report_int16x8(tmp_path: Path) -> None:
    """A classifier head and a box head: both compared, the box by its numbers (not as four classes)."""
    model, calibration, data = two_head_files(tmp_path / "model")
    out = tmp_path / "out"
    code, _, stderr = invoke("run", model, "-q", "int16x8", "--calibration-data", calibration,
                             "--data", data, "-o", out, *FAST)
    assert code == 0, stderr
    metrics = report(out)["int16x8"]["metrics"]
    outputs = metrics["outputs"]
    # LiteRT lists a signature's outputs sorted by name, so the box comes first.
    assert list(outputs) == ["box", "digit"]
    assert outputs["box"]["task"] == "regression" and outputs["box"]["shape"] == [4]
    assert outputs["box"]["relative_error"]["mean"] < 0.05 and "agreement" not in outputs["box"]
    assert outputs["digit"]["task"] == "classifier" and outputs["digit"]["shape"] == [10]
    assert outputs["digit"]["agreement"] > 0.95 and outputs["digit"]["accuracy"] > 0.85
    # The labels belong to the classifier head, not to the first output.
    assert metrics["compared_output"] == "digit" and metrics["task"] == "classifier"
    assert metrics["accuracy"] == outputs["digit"]["accuracy"]
    assert metrics["input_dtypes"] == "int16"


def test_measure_a_tflite_file(fp32_tflite: Path, files: KerasFiles) -> None:
    code, stdout, stderr = invoke("measure", fp32_tflite, "--data", files.eval, *FAST)
    assert code == 0, stderr
    assert "original" in stdout and "%" in stdout


@pytest.mark.slow
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


@pytest.mark.slow
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


# --- Keras archives and configs that inflate, and what tf_keras extracts ----------------


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return dense_model_files(tmp_path_factory.mktemp("dense"))


def check_refused(model: Path, code: int, message: str, out: Path, scratch: Path) -> None:
    """The four promises, plus nothing left in $TMPDIR."""
    before = snapshot(model.parent)
    exit_code, _, stderr = invoke("run", model, "-q", "fp16", "-o", out)
    assert exit_code == code, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {model}: ") and message in lines[0], stderr
    assert not out.exists() and list(scratch.iterdir()) == []
    assert snapshot(model.parent) == before


def test_extracted_assets_never_stay_in_tmpdir(
    dense: tuple[Path, Path], tmp_path: Path, private_tmpdir: Path
) -> None:
    """With more than three members tf_keras extracts the whole archive into a temporary
    folder and removes it only when loading succeeds: after a run, success or failure,
    $TMPDIR holds nothing."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    assets = {"assets/notes.txt": b"four members make tf_keras extract them all"}
    good = rewrite_keras_archive(dense[0], inputs / "assets.keras", assets)
    code, _, stderr = invoke("run", good, "-q", "fp16", "-o", tmp_path / "out", *FAST)
    assert code == 0, stderr
    assert list(private_tmpdir.iterdir()) == []

    def drop_kernel(file: object) -> None:
        del file[kernel_path(file)]  # type: ignore[index]

    broken = edit_keras_weights(good, inputs / "broken.keras", drop_kernel)
    check_refused(broken, 4, "cannot load the Keras model", tmp_path / "out2", private_tmpdir)


def _inflating(name: str, size: int, compression: int = zipfile.ZIP_DEFLATED) -> Callable[[Path, Path], Path]:
    def build(source: Path, destination: Path) -> Path:
        content = b'{"padding": "' + b" " * size + b'"}' if name == "config.json" else bytes(size)
        return rewrite_keras_archive(source, destination, {name: content}, compression)

    return build


def _patched(name: str, offset: int, fmt: str, value: int) -> Callable[[Path, Path], Path]:
    """Overwrite a field of ``name``'s central-directory entry (offsets from its signature)."""

    def build(source: Path, destination: Path) -> Path:
        data = bytearray(source.read_bytes())
        entries = [
            start for start in _central_entries(data)
            if data[start + 46 : start + 46 + struct.unpack_from("<H", data, start + 28)[0]] == name.encode()
        ]
        struct.pack_into(fmt, data, entries[0] + offset, value)
        destination.write_bytes(bytes(data))
        return destination

    return build


def _central_entries(data: bytearray) -> list[int]:
    starts, position = [], data.find(b"PK\x01\x02")
    while position >= 0:
        starts.append(position)
        position = data.find(b"PK\x01\x02", position + 1)
    return starts


def _nested(source: Path, destination: Path) -> Path:
    return rewrite_keras_archive(source, destination, {"config.json": b"[" * 50_000 + b"]" * 50_000})


INFLATING: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "config bomb": (_inflating("config.json", 100 << 20), "'config.json' inflates from"),
    "config over the cap": (_inflating("config.json", 65 << 20, zipfile.ZIP_STORED),
                            "config.json is 68,157,455 bytes, over"),
    "member bomb": (_inflating("assets/zeros.bin", 8 << 20), "'assets/zeros.bin' inflates from"),
    "declared 3 GB": (_patched("config.json", 24, "<I", 3_000_000_000), "declares 3,000,000,000 bytes in"),
    "larger than the archive": (_patched("model.weights.h5", 20, "<I", 2_000_000_000), "but the archive has"),
    "encrypted": (_patched("config.json", 8, "<H", 1), "is encrypted"),
    "unknown compression": (_patched("config.json", 10, "<H", 99), "unknown compression method 99"),
    "nested config": (_nested, "nested too deeply"),
}


@pytest.mark.parametrize("case", INFLATING)
def test_archives_that_inflate_or_lie_are_refused_before_reading(
    dense: tuple[Path, Path], tmp_path: Path, private_tmpdir: Path, case: str
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    build, message = INFLATING[case]
    model = build(dense[0], inputs / "model.keras")
    check_refused(model, 4, message, tmp_path / "out", private_tmpdir)


def test_an_h5_config_over_the_cap_is_refused(
    dense: tuple[Path, Path], tmp_path: Path, private_tmpdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hdf5, "CONFIG_LIMIT", 100)  # real configs are larger
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    model = inputs / "model.h5"
    model.write_bytes(dense[1].read_bytes())
    check_refused(model, 4, "its model_config is", tmp_path / "out", private_tmpdir)


# --- .tflite files the interpreter trusts -------------------------------------------------

TFLITE_DAMAGE: dict[str, tuple[Callable[[Any], None], str]] = {
    # The interpreter raised RuntimeError at allocation: once an internal error (exit 1).
    "operator input out of range": (
        lambda model: model.subgraphs[0].operators[0].inputs.__setitem__(0, 9999),
        "Invalid tensor index 9999 in node inputs",
    ),
    "subgraph output out of range": (
        lambda model: model.subgraphs[0].outputs.__setitem__(0, -7),
        "Invalid tensor index -7 in outputs",
    ),
    # A signature naming a missing subgraph crashed the main process (SIGSEGV).
    "signature subgraph out of range": (
        lambda model: setattr(model.signatureDefs[0], "subgraphIndex", 7), "crashed opening it: SIGSEGV"
    ),
    "tensor buffer out of range": (
        lambda model: setattr(model.subgraphs[0].tensors[0], "buffer", 9999), "out of range buffer 9999"
    ),
}


@pytest.mark.parametrize("damage", TFLITE_DAMAGE)
def test_tflite_with_indices_out_of_range_is_invalid(
    fp32_tflite: Path, tmp_path: Path, private_tmpdir: Path, damage: str
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    edit, message = TFLITE_DAMAGE[damage]
    model = edit_tflite(fp32_tflite, inputs / "model.tflite", edit)
    check_refused(model, 4, message, tmp_path / "out", private_tmpdir)


def _lone_layer(source: Path, destination: Path) -> Path:
    import h5py
    import numpy as np

    layer = json.loads(zipfile.ZipFile(source).read("config.json"))["config"]["layers"][1]
    config = {**layer, "module": "keras.layers", "registered_name": None,
              "build_config": {"input_shape": [None, 4]}}
    weights = io.BytesIO()
    with h5py.File(weights, "w") as file:
        file["vars/0"] = np.zeros((4, 2), np.float32)
        file["vars/1"] = np.zeros(2, np.float32)
    return rewrite_keras_archive(
        source, destination, {"config.json": json.dumps(config).encode(), "model.weights.h5": weights.getvalue()}
    )


def _unbuilt_sequential(source: Path, destination: Path) -> Path:
    config = {"module": "keras", "class_name": "Sequential", "registered_name": None,
              "config": {"name": "empty", "layers": []}}
    return rewrite_keras_archive(source, destination, {"config.json": json.dumps(config).encode()})


@pytest.mark.parametrize(
    ("build", "message"),
    [(_lone_layer, "holds a single Dense layer"), (_unbuilt_sequential, "without defined input shapes")],
    ids=["lone layer", "unbuilt Sequential"],
)
def test_a_keras_file_without_a_whole_model_is_invalid(
    dense: tuple[Path, Path], tmp_path: Path, private_tmpdir: Path,
    build: Callable[[Path, Path], Path], message: str,
) -> None:
    """Both loaded, then failed on the model's inputs: once an internal error (exit 1)."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    check_refused(build(dense[0], inputs / "model.keras"), 4, message, tmp_path / "out", private_tmpdir)


def test_a_saved_model_with_a_damaged_fingerprint_is_invalid(
    dense: tuple[Path, Path], tmp_path: Path, private_tmpdir: Path
) -> None:
    """TensorFlow loads past it but logs a 10-line traceback on stderr, once per load."""
    from compressor_frontends.keras import frameworks

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    folder = inputs / "saved"
    frameworks.keras().models.load_model(dense[0]).save(folder)
    fingerprint = folder / "fingerprint.pb"
    fingerprint.write_bytes(fingerprint.read_bytes()[:20])
    check_refused(folder, 4, "has a damaged fingerprint.pb", tmp_path / "out", private_tmpdir)
