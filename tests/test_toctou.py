"""Files that change after compressor checked them: ONNX external data and the .onnx
itself swapped for symlinks or cut short between the load's check and the reads
that follow, and SavedModel assets named outside their folder.

Each read opens its file once and checks the opened descriptor, so the swaps are
done for real between the load (the check) and the save (the read)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx_fixtures import set_external_location, tiny_onnx_with_external_data

from compressor import Context, InvalidInputError, UnsafeInputError
from compressor_frontends.pytorch.export import LARGE_MODEL_VARIABLE
from compressor_onnx import plugin

#: What the tiny model's weight holds (onnx_fixtures): 32 float32s, 128 bytes.
WEIGHT = np.arange(32, dtype=np.float32).reshape(8, 4)


def _load(path: Path) -> tuple[Any, Context]:
    defaults = {key: param.default for key, param in plugin.backend().options.items()}
    context = Context(options=defaults)
    return plugin.compressor_load(path, "onnx", context), context


def _secret(folder: Path) -> bytes:
    """A file outside the model's folder, as long as the weight, with bytes no model holds."""
    secret = bytes(range(1, 129))
    (folder / "secret.bin").write_bytes(secret)
    return secret


def _swap_for_symlink(name: Path, target: Path) -> None:
    """Replace ``name`` by a symlink to ``target`` in one rename, as an attacker would."""
    link = name.with_name(name.name + ".tmp")
    os.symlink(target, link)
    os.replace(link, name)


def _published(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file())


@pytest.fixture
def large(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every model is large: kept on disk, its external data read when each step (and the save) runs."""
    monkeypatch.setenv(LARGE_MODEL_VARIABLE, "1")


def test_external_data_swapped_for_a_symlink_after_the_check_is_never_published(
        tmp_path: Path, large: None) -> None:
    path = tiny_onnx_with_external_data(tmp_path / "model")
    secret = _secret(tmp_path)
    model, context = _load(path)
    assert model.handle.path == path  # checked at load, read only when saved
    _swap_for_symlink(path.parent / "weights.bin", tmp_path / "secret.bin")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnsafeInputError, match="outside the model's folder") as caught:
        plugin.compressor_save(model, out / "original", context)
    assert caught.value.exit_code == 3 and "\n" not in str(caught.value)
    assert secret not in _published(out)


def test_the_onnx_swapped_for_one_pointing_outside_after_the_check_is_refused(
        tmp_path: Path, large: None) -> None:
    path = tiny_onnx_with_external_data(tmp_path / "model")
    secret = _secret(tmp_path)
    model, context = _load(path)
    set_external_location(path, str(tmp_path / "secret.bin"))  # the .onnx now names an absolute path
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnsafeInputError, match="absolute path"):
        plugin.compressor_save(model, out / "original", context)
    assert secret not in _published(out)


def test_external_data_cut_short_after_the_check_is_exit_4_in_one_line(tmp_path: Path, large: None) -> None:
    path = tiny_onnx_with_external_data(tmp_path / "model")
    model, context = _load(path)
    data = path.parent / "weights.bin"
    os.truncate(data, 50)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InvalidInputError, match="cut short") as caught:
        plugin.compressor_save(model, out / "original", context)
    assert caught.value.exit_code == 4 and "\n" not in str(caught.value)


def test_a_file_replaced_after_it_was_opened_is_not_what_is_read(tmp_path: Path) -> None:
    """The check and the read use one descriptor: whatever the name becomes in between."""
    import onnx

    from compressor_onnx.safety import ExternalFiles, external_tensors

    path = tiny_onnx_with_external_data(tmp_path / "model")
    _secret(tmp_path)
    (tensor,) = external_tensors(onnx.load(str(path), load_external_data=False), path)
    with ExternalFiles(path) as files:
        files.check(tensor)
        _swap_for_symlink(path.parent / "weights.bin", tmp_path / "secret.bin")
        data = files.read(tensor)
    np.testing.assert_array_equal(np.frombuffer(data, dtype=np.float32).reshape(8, 4), WEIGHT)
    # Opened afresh, the symlink now at the checked name is refused.
    with ExternalFiles(path) as files, pytest.raises(UnsafeInputError, match="symlink"):
        files.check(tensor)


def test_a_file_cut_short_between_its_check_and_its_read_is_exit_4(tmp_path: Path) -> None:
    import onnx

    from compressor_onnx.safety import ExternalFiles, external_tensors, read_range

    path = tiny_onnx_with_external_data(tmp_path / "model")
    (tensor,) = external_tensors(onnx.load(str(path), load_external_data=False), path)
    with ExternalFiles(path) as files:
        descriptor, end = files.check(tensor)  # the size checked on the descriptor...
        os.truncate(path.parent / "weights.bin", 64)
        with pytest.raises(InvalidInputError, match="ends at 64 bytes, 128 needed") as caught:
            read_range(descriptor, tensor.offset, end, tensor.location, path)  # ...and against what is read
        with pytest.raises(InvalidInputError, match="shorter"):
            files.read(tensor)
    assert caught.value.exit_code == 4


def test_a_fifo_as_external_data_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tiny_onnx_with_external_data(tmp_path / "model")
    (path.parent / "weights.bin").unlink()
    os.mkfifo(path.parent / "weights.bin")
    with pytest.raises(InvalidInputError, match="not a regular file"):
        _load(path)


def test_a_symlink_inside_the_folder_is_refused_as_onnx_refuses_it(tmp_path: Path) -> None:
    path = tiny_onnx_with_external_data(tmp_path / "model")
    (path.parent / "weights.bin").rename(path.parent / "real.bin")
    os.symlink("real.bin", path.parent / "weights.bin")
    with pytest.raises(InvalidInputError, match="is a symbolic link"):
        _load(path)


@pytest.fixture(scope="module")
def vocabulary_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SavedModel whose lookup table reads its vocabulary from an asset while loading."""
    from compressor_frontends.keras import frameworks

    tf = frameworks.tensorflow()
    folder = tmp_path_factory.mktemp("vocabulary")
    vocabulary = folder / "vocab.txt"
    vocabulary.write_text("cat\ndog\nbird\n")

    class Lookup(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.asset = tf.saved_model.Asset(str(vocabulary))
            initializer = tf.lookup.TextFileInitializer(
                self.asset, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
                tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER)
            self.table = tf.lookup.StaticHashTable(initializer, -1)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="words")])
        def __call__(self, words: Any) -> Any:
            return {"ids": self.table.lookup(words)}

    module = Lookup()
    path = folder / "lookup_saved_model"
    tf.saved_model.save(module, str(path), signatures=module.__call__)
    return path


def _copy_with_asset(source: Path, target: Path, asset: str) -> Path:
    import shutil

    from tensorflow.core.protobuf import saved_model_pb2

    shutil.copytree(source, target)
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((target / "saved_model.pb").read_bytes())
    saved.meta_graphs[0].asset_file_def[0].filename = asset
    (target / "saved_model.pb").write_bytes(saved.SerializeToString())
    return target


def test_a_saved_model_asset_named_outside_its_folder_is_refused(vocabulary_model: Path, tmp_path: Path) -> None:
    from compressor_frontends.keras import loading

    assert loading.asset_names(vocabulary_model) == ["vocab.txt"]
    _, fmt, _ = loading.load(vocabulary_model, trust=False)  # the model as saved loads
    assert fmt == "saved_model"
    (tmp_path / "outside.txt").write_text("secret\n")
    escaping = _copy_with_asset(vocabulary_model, tmp_path / "a" / "escaping", "../../../outside.txt")
    # TensorFlow itself would read it: the table then knows the outside file's words.
    tf = __import__("tensorflow")
    naive = tf.saved_model.load(str(escaping)).signatures["serving_default"]
    assert naive(words=tf.constant(["secret"]))["ids"].numpy().tolist() == [0]
    with pytest.raises(UnsafeInputError, match="outside its assets folder") as caught:
        loading.load(escaping, trust=True)
    assert caught.value.exit_code == 3


def test_a_saved_model_asset_swapped_for_a_symlink_is_refused(vocabulary_model: Path, tmp_path: Path) -> None:
    from compressor_frontends.keras import loading

    (tmp_path / "outside.txt").write_text("secret\n")
    linked = _copy_with_asset(vocabulary_model, tmp_path / "linked", "vocab.txt")
    _swap_for_symlink(linked / "assets" / "vocab.txt", tmp_path / "outside.txt")
    with pytest.raises(UnsafeInputError, match="through a symlink"):
        loading.load(linked, trust=False)
