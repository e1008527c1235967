"""Benchmark the tflite backend on two Keras models trained on scikit-learn's digits.

* ``digits-cnn``: a CNN whose ~150k weights dominate the file;
* ``digits-lstm``: Conv1D + BatchNorm + two LSTMs over the 8 image rows;
* ``digits-gru``: Conv1D + BatchNorm + GRU, which TFLite converts to a while
  loop (static batch); its int8/uint8 calibration crashes TensorFlow 2.21, so
  the backend refuses those modes and the GRU model gets fp16 and dynamic only.

Each model goes through ``compressor run`` (a real subprocess) with fp16,
dynamic, int8, uint8 and 80% sparsity (fine-tuned) then int8, and the floors
of the tflite issue are checked. Run: ``python benchmarks/bench_tflite.py``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import compressor_cli, machine, markdown_table, write_section

DISTRIBUTIONS = ("tensorflow-cpu", "tf-keras", "tensorflow-model-optimization", "ai-edge-litert")
PRUNE_EPOCHS = 10
FLOAT_RECIPE = """
[variants.fp16]
steps = ["quantize fp16"]
[variants.dynamic]
steps = ["quantize dynamic"]
"""
RECIPE = FLOAT_RECIPE + f"""
[variants.int8]
steps = ["quantize int8"]
[variants.uint8]
steps = ["quantize uint8"]
[variants.sparse80-int8]
steps = ["prune 0.8 epochs={PRUNE_EPOCHS}", "quantize int8"]
"""
#: variant -> (smallest size ratio, which size, largest accuracy drop in points)
FLOORS = {
    "fp16": (1.9, "size_bytes", 0.1),
    "dynamic": (3.5, "size_bytes", 1.0),
    "int8": (3.5, "size_bytes", 1.0),
    "uint8": (3.5, "size_bytes", 1.0),
    "sparse80-int8": (8.0, "size_gzip_bytes", 1.0),
}


def digits_cnn(keras: Any) -> Any:
    layers = keras.layers
    inputs = keras.Input((8, 8, 1), name="image")
    hidden = layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    hidden = layers.Conv2D(64, 3, padding="same", activation="relu")(hidden)
    hidden = layers.MaxPooling2D()(hidden)
    hidden = layers.Flatten()(hidden)
    hidden = layers.Dense(128, activation="relu")(hidden)
    hidden = layers.Dropout(0.3)(hidden)
    return keras.Model(inputs, layers.Dense(10, activation="softmax")(hidden), name="digits_cnn")


def trained_digits_cnn(epochs: int = 30) -> tuple[Any, Any, Any, Any, Any]:
    """``digits_cnn`` trained on the digits' training split (seed 0), with the split:
    (model, train_x, train_y, test_x, test_y)."""
    from compressor_tflite import frameworks
    from compressor_tflite.samples import digits

    keras = frameworks.keras()
    keras.utils.set_random_seed(0)
    train_x, train_y, test_x, test_y = digits()
    model = digits_cnn(keras)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy")
    model.fit(train_x, train_y, epochs=epochs, batch_size=32, verbose=0)
    return model, train_x, train_y, test_x, test_y


def recurrent(keras: Any, name: str, cell: str) -> Any:
    layers = keras.layers
    inputs = keras.Input((8, 8), name="rows")
    hidden = layers.Conv1D(64, 3, padding="same")(inputs)
    hidden = layers.BatchNormalization()(hidden)
    hidden = layers.Activation("relu")(hidden)
    if cell == "lstm":
        hidden = layers.LSTM(96, return_sequences=True)(hidden)
        hidden = layers.LSTM(96)(hidden)
    else:
        hidden = layers.GRU(192)(hidden)
    hidden = layers.BatchNormalization()(hidden)
    return keras.Model(inputs, layers.Dense(10, activation="softmax")(hidden), name=name)


def digits_lstm(keras: Any) -> Any:
    return recurrent(keras, "digits_lstm", "lstm")


def digits_gru(keras: Any) -> Any:
    return recurrent(keras, "digits_gru", "gru")


def build(folder: Path, name: str, make: Callable[[Any], Any], shape: tuple[int, ...]) -> dict[str, Path]:
    from compressor_tflite import frameworks
    from compressor_tflite.samples import digits

    keras = frameworks.keras()
    keras.utils.set_random_seed(0)
    train_x, train_y, test_x, test_y = digits()
    train_x, test_x = train_x.reshape(-1, *shape), test_x.reshape(-1, *shape)
    model = make(keras)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy")
    model.fit(train_x, train_y, epochs=40, batch_size=32, verbose=0)
    paths = {
        "model": folder / f"{name}.keras",
        "train": folder / f"{name}-train.npz",
        "calibration": folder / f"{name}-calibration.npz",
        "eval": folder / f"{name}-eval.npz",
    }
    model.save(paths["model"])
    np.savez(paths["train"], x=train_x, y=train_y)
    np.savez(paths["calibration"], x=train_x[:300])
    np.savez(paths["eval"], x=test_x, y=test_y)
    print(f"{name}: {model.count_params():,} parameters", file=sys.stderr)
    return paths


def run(folder: Path, name: str, paths: dict[str, Path], recipe: Path) -> tuple[list[list[str]], list[str]]:
    out = folder / f"{name}-out"
    compressor_cli(
        "run", str(paths["model"]), "--recipe", str(recipe), "--train-data", str(paths["train"]),
        "--calibration-data", str(paths["calibration"]), "--data", str(paths["eval"]),
        "-o", str(out), "--repeats", "3",
    )
    report = json.loads((out / "report.json").read_text())
    variants = {variant["name"]: variant for variant in report["variants"]}
    base = variants["original"]["metrics"]
    rows, failures = [], []
    for variant_name, variant in variants.items():
        metrics = variant["metrics"]
        size_ratio = base["size_bytes"] / metrics["size_bytes"]
        gzip_ratio = base["size_gzip_bytes"] / metrics["size_gzip_bytes"]
        drop = (base["accuracy"] - metrics["accuracy"]) * 100
        verdict = "-"
        if variant_name in FLOORS:
            floor, which, max_drop = FLOORS[variant_name]
            ratio = size_ratio if which == "size_bytes" else gzip_ratio
            passed = ratio >= floor and drop <= max_drop
            verdict = "pass" if passed else "FAIL"
            if not passed:
                failures.append(f"{name}/{variant_name}: {ratio:.2f}x, drop {drop:.2f} pt")
        rows.append([
            name, variant_name, f"{metrics['size_bytes'] / 1024:.1f} KB", f"{size_ratio:.2f}x",
            f"{metrics['size_gzip_bytes'] / 1024:.1f} KB", f"{gzip_ratio:.2f}x",
            f"{metrics['accuracy'] * 100:.2f}%", f"{drop:+.2f}", f"{metrics['agreement'] * 100:.2f}%",
            f"{metrics['latency_ms']['p50']:.3f}", f"{metrics['load_ms']:.1f}",
            f"{metrics['peak_rss_bytes'] / 2**20:.0f} MB", verdict,
        ])
    return rows, failures


def main() -> int:
    header = ["model", "variant", "size", "smaller", "gzip", "gzip smaller", "accuracy",
              "drop pt", "agreement", "p50 ms", "load ms", "worker RSS", "floor"]
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="bench-tflite-") as scratch:
        folder = Path(scratch)
        models = (
            ("digits-cnn", digits_cnn, (8, 8, 1), RECIPE),
            ("digits-lstm", digits_lstm, (8, 8), RECIPE),
            ("digits-gru", digits_gru, (8, 8), FLOAT_RECIPE),
        )
        for name, make, shape, text in models:
            recipe = folder / f"{name}.toml"
            recipe.write_text(text)
            paths = build(folder, name, make, shape)
            model_rows, model_failures = run(folder, name, paths, recipe)
            rows += model_rows
            failures += model_failures
    table = markdown_table(header, rows)
    print(table)
    floors = (
        "Floors: fp16 >= 1.9x smaller and <= 0.1 pt accuracy drop; dynamic, int8, uint8 >= 3.5x "
        f"smaller and <= 1 pt; 80% sparsity ({PRUNE_EPOCHS} epochs of fine-tuning) then int8 "
        ">= 8x smaller gzipped than the fp32 .tflite gzipped and <= 1 pt. "
        "The original is the fp32 .tflite conversion of the Keras model. Evaluation: 540 held-out "
        "digits; latency is batch 1, one thread, median of 3 interleaved repeats. Worker RSS is "
        "the measuring process's own high-water mark (VmHWM)."
    )
    result = "All floors hold." if not failures else "Floors missed: " + "; ".join(failures) + "."
    write_section(
        "tflite",
        "## tflite backend (`benchmarks/bench_tflite.py`)\n\n"
        f"{machine(DISTRIBUTIONS)}\n\n{table}\n\n{floors} {result}\n",
    )
    if failures:
        print(result, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
