"""Big ONNX models on disk in proportion: a variant's weights are written once.

A step past the large-model threshold writes its model into the scratch folder; saving it moves
that data file into staging (on --out's filesystem) instead of writing it again, and publishing
renames it into --out. The user's files are never moved or linked, only copied. On the in-memory
path, dynamic int8 hands ONNX Runtime the graph rather than a file of it, so that only its own
temporary copy is ever on disk, and that copy goes into our scratch folder, not $TMPDIR.

Models are small (the threshold is lowered), built in the test.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from conftest import snapshot
from onnx_fixtures import write_external_mlp

from compressor import Context, Step
from compressor.cli import cli
from compressor_frontends.pytorch.export import LARGE_MODEL_VARIABLE
from compressor_onnx import external, plugin
from compressor_onnx.int8_file import quantize_dynamic_graph

LOW = "2000"
WIDTHS = (256, 512, 384, 10)
RECIPE = """
[variants.prune]
steps = ["prune 0.5"]

[variants.prune-dynamic]
steps = ["prune 0.5", "quantize dynamic"]
"""


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_external_mlp(tmp_path_factory.mktemp("mlp"), widths=WIDTHS)


def options() -> dict[str, object]:
    return {key: param.default for key, param in plugin.backend().options.items()}


def outputs(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def data_file(path: Path) -> Path:
    return path.with_name(f"{path.name}.data")


def test_a_steps_data_file_is_moved_into_staging_and_the_users_is_copied(
        mlp: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_path, eval_path = mlp
    monkeypatch.setenv(LARGE_MODEL_VARIABLE, LOW)
    inputs = snapshot(model_path.parent)
    workdir, staging = tmp_path / "work", tmp_path / "staging"
    workdir.mkdir()
    staging.mkdir()
    context = Context(options=options(), workdir=workdir)
    loaded = plugin.compressor_load(model_path, "onnx", context)
    x = np.load(eval_path)["x"]

    original = plugin.compressor_save(loaded, staging / "original", context)
    user_data = os.stat(data_file(model_path))
    assert os.stat(original.side_files[0]).st_ino != user_data.st_ino and user_data.st_nlink == 1

    pruned = plugin.compressor_compress(plugin.compressor_fork(loaded, context), Step("prune", {"sparsity": 0.5}),
                                        context)
    scratch = pruned.handle.path
    written = os.stat(data_file(scratch))
    saved = plugin.compressor_save(pruned, staging / "prune", context)
    moved = os.stat(saved.side_files[0])
    assert (moved.st_ino, moved.st_nlink) == (written.st_ino, 1)  # the same bytes, under one name
    assert not data_file(scratch).exists() and pruned.handle.path == saved.path
    pruned_outputs = outputs(saved.path, x)

    # The next variant starts from the saved model (a fork, as the step tree makes it), now in staging.
    dynamic = plugin.compressor_compress(plugin.compressor_fork(pruned, context), Step("quantize", {"mode": "dynamic"}),
                                         context)
    first = plugin.compressor_save(dynamic, staging / "dynamic", context)
    again = plugin.compressor_save(dynamic, staging / "dynamic-again", context)  # a second save: a copy
    assert os.stat(first.side_files[0]).st_ino != os.stat(again.side_files[0]).st_ino
    assert first.side_files[0].read_bytes() == again.side_files[0].read_bytes()
    for artifact in (first, again):
        onnx.checker.check_model(str(artifact.path))
        onnx.load(str(artifact.path))  # onnx refuses a data file with two names
        np.testing.assert_allclose(outputs(artifact.path, x), pruned_outputs, rtol=0.1, atol=0.1)
    np.testing.assert_array_equal(outputs(saved.path, x), pruned_outputs)
    np.testing.assert_allclose(outputs(original.path, x), outputs(model_path, x), rtol=0, atol=0)
    assert snapshot(model_path.parent) == inputs


def test_a_run_writes_each_variants_weights_once(mlp: tuple[Path, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every byte of model data the run writes, counted: the original's copy, then each
    variant's weights once (before, each was written to scratch and then again into staging)."""
    model_path, eval_path = mlp
    monkeypatch.setenv(LARGE_MODEL_VARIABLE, LOW)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    counted: list[tuple[str, int]] = []
    close = external.DataWriter.close

    def counting_close(writer: external.DataWriter) -> None:
        counted.append((writer.path.name, writer.written))
        close(writer)

    monkeypatch.setattr(external.DataWriter, "close", counting_close)
    out, recipe = tmp_path / "out", tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)  # the pruned model is saved, then quantized: one step tree
    result = CliRunner().invoke(cli, ["run", str(model_path), "--recipe", str(recipe), "--data", str(eval_path),
                                      "-o", str(out), "--min-seconds", "0", "--precision", "off", "--no-cache"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [variant["error"] for variant in report["variants"]] == [None, None, None]
    published = {name: out / f"{name}.onnx.data" for name in ("original", "prune", "prune-dynamic")}
    sizes = {name: path.stat().st_size for name, path in published.items()}
    assert all(os.stat(path).st_nlink == 1 for path in published.values())
    # Data files hold each tensor's bytes plus alignment padding: what was written fits in them.
    assert sum(written for _, written in counted) <= sum(sizes.values())
    assert sum(written for _, written in counted) > sizes["original"] + sizes["prune"] + sizes["prune-dynamic"] / 2
    assert list(scratch.iterdir()) == []


def test_in_memory_dynamic_int8_hands_onnx_runtime_the_graph(mlp: tuple[Path, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The same bytes as ONNX Runtime's own ``quantize_dynamic`` on a file of the graph, with its
    temporary copies beside the result (a $TMPDIR it cannot write would otherwise fail it)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model_path, _ = mlp
    graph = onnx.load(str(model_path))
    inline = tmp_path / "inline.onnx"
    onnx.save_model(graph, str(inline))
    expected = tmp_path / "expected.onnx"
    quantize_dynamic(inline, expected, weight_type=QuantType.QInt8, per_channel=True)

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    folder = tmp_path / "quantize"
    folder.mkdir()
    target = folder / "quantize-out.onnx"
    metadata = quantize_dynamic_graph(graph, target, Step("quantize", {"mode": "dynamic", "per_channel": True, "reduce_range": "false"}), [])
    assert metadata == {"reduce_range": False}
    assert [path.name for path in folder.iterdir()] == [target.name]  # its temporary copies are gone
    assert target.read_bytes() == expected.read_bytes()


def test_a_steps_model_on_another_filesystem_is_copied_and_stays_where_it_was(
        mlp: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$TMPDIR on another filesystem than --out: no hard link there (EXDEV), so the save
    writes the weights into staging and the step's model stays whole in scratch."""
    import errno

    model_path, eval_path = mlp
    monkeypatch.setenv(LARGE_MODEL_VARIABLE, LOW)
    workdir = tmp_path / "work"
    workdir.mkdir()
    context = Context(options=options(), workdir=workdir)
    loaded = plugin.compressor_load(model_path, "onnx", context)
    dynamic = plugin.compressor_compress(loaded, Step("quantize", {"mode": "dynamic"}), context)
    scratch = dynamic.handle.path
    before = data_file(scratch).read_bytes()

    def cross_device(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    with monkeypatch.context() as patched:
        patched.setattr(os, "link", cross_device)
        artifact = plugin.compressor_save(dynamic, tmp_path / "dynamic", context)
    assert dynamic.handle.path == scratch and data_file(scratch).read_bytes() == before
    assert artifact.side_files[0].read_bytes() == before
    x = np.load(eval_path)["x"]
    np.testing.assert_array_equal(outputs(artifact.path, x), outputs(scratch, x))
