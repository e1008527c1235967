"""The sample model for ``compressor demo``: a small Keras CNN on scikit-learn's 8x8 digits,
built with the Keras front end's tf-keras; the backend's demo model, so it lives here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compressor.plugin import SampleModel
from compressor_frontends.keras import frameworks

SAMPLE_VARIANTS = (
    ("quantize fp16",),
    ("quantize dynamic",),
    ("quantize int8",),
    ("prune 0.5 epochs=1", "quantize int8"),
)


def digits(seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """Digits as (train x, train y, test x, test y): images of shape (8, 8, 1) in [0, 1]."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    order = np.random.default_rng(seed).permutation(len(images))
    images, labels = images[order], labels[order].astype(np.int64)
    split = int(len(images) * 0.7)
    return images[:split], labels[:split], images[split:], labels[split:]


def small_cnn(filters: int = 16, dense: int = 64) -> Any:
    keras = frameworks.keras()
    layers = keras.layers
    inputs = keras.Input((8, 8, 1), name="image")
    hidden = layers.Conv2D(filters, 3, padding="same", activation="relu")(inputs)
    hidden = layers.MaxPooling2D()(hidden)
    hidden = layers.Conv2D(filters * 2, 3, padding="same", activation="relu")(hidden)
    hidden = layers.Flatten()(hidden)
    hidden = layers.Dense(dense, activation="relu")(hidden)
    outputs = layers.Dense(10, activation="softmax")(hidden)
    model = keras.Model(inputs, outputs, name="digits_cnn")
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    return model


def write_digits_data(directory: Path, seed: int = 0) -> tuple[Any, Any]:
    """Write train.npz, calibration.npz and eval.npz; return the training arrays."""
    train_x, train_y, test_x, test_y = digits(seed)
    np.savez(directory / "train.npz", x=train_x, y=train_y)
    np.savez(directory / "calibration.npz", x=train_x[:200])
    np.savez(directory / "eval.npz", x=test_x, y=test_y)
    return train_x, train_y


def digits_sample(directory: Path) -> SampleModel:
    keras = frameworks.keras()
    keras.utils.set_random_seed(0)
    train_x, train_y = write_digits_data(directory)
    model = small_cnn()
    model.fit(train_x, train_y, epochs=8, batch_size=32, verbose=0)
    path = directory / "digits_cnn.keras"
    model.save(path)
    return SampleModel(
        backend="tflite",
        name="digits-cnn",
        path=path,
        variants=SAMPLE_VARIANTS,
        eval_data=directory / "eval.npz",
        calibration_data=directory / "calibration.npz",
        train_data=directory / "train.npz",
        description="small Keras CNN on scikit-learn digits (8x8), fp32 TFLite vs compressed",
    )
