"""Small Keras models and data files for the tflite backend's tests, built once per module."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Measured:
    """What core's engine found for one ``.tflite``, measured in this process as the measuring
    process does (it also times opening the runtime as ``load_ms``)."""

    metrics: dict[str, Any]
    outputs: dict[str, dict[str, Any]]
    kept: dict[str, dict[str, Any]]

    @property
    def first(self) -> dict[str, Any]:
        """What was kept of the first output."""
        return next(iter(self.kept.values()))

    @property
    def predictions(self) -> Any:
        """Top-1 of the first output (a classifier's classes)."""
        return self.first["top1"]

    def values(self, name: str | None = None) -> Any:
        """The raw float rows of an output (the first by default), whichever task it has."""
        kept = self.kept[name] if name is not None else self.first
        return kept["scores"] if "scores" in kept else kept["values"]


def measure_here(artifact: Any, data: Any, settings: Any) -> Measured:
    """Open the artifact's tflite runtime and let core measure it."""
    from compressor.engine import measure_runtime
    from compressor.measuring import Stopwatch
    from compressor_tflite import plugin

    with Stopwatch() as load:
        runtime = plugin.compressor_open_runtime(artifact, settings)
    try:
        measured = measure_runtime(runtime, data, settings)
    finally:
        runtime.close()
    return Measured({**measured.metrics, "load_ms": load.ms}, measured.outputs, measured.kept)


@dataclass
class KerasFiles:
    folder: Path
    keras: Path
    h5: Path
    saved_model: Path
    train: Path
    calibration: Path
    eval: Path


def tiny_digits_files(folder: Path) -> KerasFiles:
    """A tiny CNN on scikit-learn digits (a few seconds of training), saved three ways."""
    from compressor_frontends.keras import frameworks
    from compressor_tflite.samples import small_cnn, write_digits_data

    keras = frameworks.keras()
    keras.utils.set_random_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = write_digits_data(folder)
    model = small_cnn(filters=8, dense=96)
    model.fit(train_x, train_y, epochs=6, batch_size=32, verbose=0)
    model.save(folder / "cnn.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "HDF5 is a legacy format"
        model.save(folder / "cnn.h5")
    model.save(folder / "cnn_saved_model")
    return KerasFiles(
        folder,
        folder / "cnn.keras",
        folder / "cnn.h5",
        folder / "cnn_saved_model",
        folder / "train.npz",
        folder / "calibration.npz",
        folder / "eval.npz",
    )


def ink_boxes(images: Any) -> Any:
    """The box around each digit's ink (pixels over 0.25): top, left, bottom, right, in pixels."""
    ink = images[..., 0] > 0.25
    rows, columns = ink.any(axis=2), ink.any(axis=1)

    def first(mask: Any) -> Any:
        return mask.argmax(axis=1)

    def last(mask: Any) -> Any:
        return mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)

    return np.stack([first(rows), first(columns), last(rows), last(columns)], axis=1).astype("float32")


def two_head_files(folder: Path) -> tuple[Path, Path, Path]:
    """A digits CNN with two heads, trained a few epochs: ``digit`` (10 classes, softmax) and
    ``box`` (4 numbers: where the ink is). Returns the .keras, calibration and eval files."""
    from compressor_frontends.keras import frameworks
    from compressor_tflite.samples import digits

    keras = frameworks.keras()
    keras.utils.set_random_seed(7)
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y, test_x, test_y = digits()
    layers = keras.layers
    inputs = keras.Input((8, 8, 1), name="image")
    hidden = layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    hidden = layers.Dense(64, activation="relu")(layers.Flatten()(hidden))
    heads = [layers.Dense(10, activation="softmax", name="digit")(hidden), layers.Dense(4, name="box")(hidden)]
    model = keras.Model(inputs, heads)
    model.compile(keras.optimizers.Adam(3e-3), loss=["sparse_categorical_crossentropy", "mse"])
    model.fit(train_x, [train_y, ink_boxes(train_x)], epochs=4, batch_size=32, verbose=0)
    model.save(folder / "two_heads.keras")
    np.savez(folder / "calibration.npz", image=train_x[:200])
    np.savez(folder / "eval.npz", image=test_x, y=test_y)
    return folder / "two_heads.keras", folder / "calibration.npz", folder / "eval.npz"


def lambda_model_files(folder: Path) -> tuple[Path, Path]:
    """The same small model with a Lambda layer, as .keras and .h5."""
    from compressor_frontends.keras import frameworks

    keras = frameworks.keras()
    folder.mkdir(parents=True, exist_ok=True)
    inputs = keras.Input((8,), name="x")
    doubled = keras.layers.Lambda(lambda tensor: tensor * 2.0, name="double")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(doubled))
    model.save(folder / "lambda.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.save(folder / "lambda.h5")
    return folder / "lambda.keras", folder / "lambda.h5"


def sine_model_file(folder: Path) -> Path:
    """A model with tf.math.sin, which has no integer kernel in TFLite."""
    from compressor_frontends.keras import frameworks

    tf, keras = frameworks.tensorflow(), frameworks.keras()
    folder.mkdir(parents=True, exist_ok=True)
    inputs = keras.Input((8,), name="x")
    hidden = tf.math.sin(keras.layers.Dense(8)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))
    model.save(folder / "sine.keras")
    rng = np.random.default_rng(1)
    np.savez(folder / "sine_calibration.npz", x=rng.normal(size=(32, 8)).astype("float32"))
    return folder / "sine.keras"


def plain_saved_model(folder: Path) -> tuple[Path, Any]:
    """A TensorFlow SavedModel that Keras did not write (a linear map), and its weights."""
    from compressor_frontends.keras import frameworks

    tf = frameworks.tensorflow()
    weights = np.random.default_rng(2).normal(size=(8, 4)).astype("float32")

    class Linear(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weights = tf.Variable(weights)

        @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32, name="features")])
        def __call__(self, features: Any) -> Any:
            return tf.matmul(features, self.weights)

    module = Linear()
    path = folder / "plain_saved_model"
    tf.saved_model.save(module, str(path), signatures=module.__call__)
    return path, weights


def corrupt_variants(source: Path, folder: Path) -> dict[str, Path]:
    """Empty, truncated-at-half and random-byte copies of ``source`` with its suffix."""
    folder.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    variants = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "random": np.random.default_rng(3).bytes(max(len(data), 64)),
    }
    paths = {}
    for name, content in variants.items():
        path = folder / f"{name}{source.suffix}"
        path.write_bytes(content)
        paths[name] = path
    return paths


def environment_without_legacy_keras() -> dict[str, str]:
    """The user's environment: TF_USE_LEGACY_KERAS unset, as the plugin must cope."""
    return {key: value for key, value in os.environ.items() if key != "TF_USE_LEGACY_KERAS"}


@functools.cache
def shared_digits_files() -> KerasFiles:
    """One tiny trained model for every tflite test module (training and saving cost seconds)."""
    folder = Path(tempfile.mkdtemp(prefix="compressor-tflite-tests-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return tiny_digits_files(folder / "digits")


def gru_model_file(folder: Path) -> tuple[Path, Path]:
    """An untrained Conv1D + GRU model (TFLite converts the GRU to a while loop) and data."""
    from compressor_frontends.keras import frameworks

    keras = frameworks.keras()
    keras.utils.set_random_seed(4)
    folder.mkdir(parents=True, exist_ok=True)
    inputs = keras.Input((6, 4), name="sequence")
    hidden = keras.layers.Conv1D(8, 3, padding="same")(inputs)
    hidden = keras.layers.GRU(8)(hidden)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))
    model.save(folder / "gru.keras")
    x = np.random.default_rng(5).normal(size=(12, 6, 4)).astype("float32")
    np.savez(folder / "gru.npz", x=x, y=model.predict(x, verbose=0).argmax(1))
    return folder / "gru.keras", folder / "gru.npz"


def dense_model_files(folder: Path) -> tuple[Path, Path]:
    """A one-layer model (a 4x2 kernel and a bias), as .keras and .h5."""
    from compressor_frontends.keras import frameworks

    keras = frameworks.keras()
    keras.utils.set_random_seed(6)
    folder.mkdir(parents=True, exist_ok=True)
    inputs = keras.Input((4,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs))
    model.save(folder / "dense.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.save(folder / "dense.h5")
    return folder / "dense.keras", folder / "dense.h5"


def rewrite_keras_archive(
    source: Path, destination: Path, members: dict[str, bytes | None], compression: int = 0
) -> Path:
    """A copy of the ``.keras`` zip ``source`` with ``members`` replaced (None: removed) or added."""
    import zipfile

    with zipfile.ZipFile(source) as archive:
        contents = {name: archive.read(name) for name in archive.namelist()}
    contents.update(members)
    with zipfile.ZipFile(destination, "w", compression) as archive:
        for name, content in contents.items():
            if content is not None:
                archive.writestr(name, content)
    return destination


def edit_keras_weights(source: Path, destination: Path, edit: Any) -> Path:
    """A copy of ``source`` (.h5 or .keras) whose HDF5 weights went through ``edit(h5py.File)``."""
    import zipfile

    import h5py

    if source.suffix == ".h5":
        shutil.copyfile(source, destination)
        with h5py.File(destination, "r+") as file:
            edit(file)
        return destination
    scratch = destination.with_name(destination.name + ".weights.h5")
    with zipfile.ZipFile(source) as archive:
        scratch.write_bytes(archive.read("model.weights.h5"))
    with h5py.File(scratch, "r+") as file:
        edit(file)
    rewrite_keras_archive(source, destination, {"model.weights.h5": scratch.read_bytes()})
    scratch.unlink()
    return destination


def kernel_path(file: Any) -> str:
    """The HDF5 path of the first 2-D weight in a Keras weights file."""
    import h5py

    found: list[str] = []
    file.visititems(
        lambda name, node: found.append(name)
        if isinstance(node, h5py.Dataset) and len(node.shape) == 2 else None
    )
    return found[0]


def edit_tflite(source: Path, destination: Path, edit: Any) -> Path:
    """A copy of the ``.tflite`` ``source`` whose unpacked schema object went through ``edit``."""
    import flatbuffers

    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(source.read_bytes()), 0)
    edit(model)
    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    destination.write_bytes(bytes(builder.Output()))
    return destination
