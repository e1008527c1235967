"""The ``npz-mlp`` backend: NumPy MLP weight archives, quantized and pruned.

A whole backend: declare it, identify and load its files, compress, save, and
open a saved file as a :class:`compressor.plugin.Runtime` that core measures. It
imports only :mod:`compressor.plugin`, the public plugin API; NumPy is imported
inside functions only, so ``compressor --help`` stays fast.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compressor.plugin import (
    Artifact,
    Backend,
    Context,
    InvalidInputError,
    MeasureSettings,
    Model,
    Param,
    Runtime,
    SampleModel,
    Step,
    Technique,
    TensorSpec,
    hookimpl,
)

NAME = "npz-mlp"
SUFFIX = ".npz"


@hookimpl
def compressor_backends() -> list[Backend]:
    return [
        Backend(
            name=NAME,
            description="NumPy MLP weight archives (example third-party plugin)",
            formats=(".npz with W0, b0, W1, b1, ...",),
            techniques={
                "quantize": Technique(
                    "quantize",
                    help="fp16 weights, or int8 weights with per-output-channel scales",
                    modes=("fp16", "dynamic"),
                ),
                "prune": Technique(
                    "prune",
                    help="magnitude pruning per layer",
                    params={
                        "sparsity": Param(float, None, "share of weights set to zero",
                                          minimum=0, maximum=1, required=True)
                    },
                ),
            },
            requires=("numpy",),
            runtime_imports=("numpy",),
            distributions=("compressor-example",),
            default_variants=(("quantize fp16",), ("quantize dynamic",)),
        )
    ]


def _is_mlp_archive(path: Path) -> bool:
    if path.suffix != SUFFIX or not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return "W0.npy" in archive.namelist()


@hookimpl
def compressor_identify(path: Path) -> str | None:
    return NAME if _is_mlp_archive(path) else None


def read_layers(path: Path) -> dict[str, Any]:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as error:  # noqa: BLE001 - zipfile/numpy raise many kinds on bad bytes
        raise InvalidInputError(f"not a readable .npz archive ({type(error).__name__})", path) from None
    if "W0" not in arrays and "W0__q" not in arrays:
        raise InvalidInputError("no W0 array: not an MLP weight archive", path)
    return arrays


def layer_count(arrays: dict[str, Any]) -> int:
    count = 0
    while f"W{count}" in arrays or f"W{count}__q" in arrays:
        count += 1
    return count


def dense_weights(arrays: dict[str, Any], index: int) -> Any:
    """Layer ``index``'s float32 weights, dequantizing int8 storage if needed."""
    import numpy as np

    if f"W{index}__q" in arrays:
        return arrays[f"W{index}__q"].astype(np.float32) * arrays[f"W{index}__scale"]
    return arrays[f"W{index}"].astype(np.float32)


@hookimpl
def compressor_load(path: Path, backend: str, context: Context) -> Model:
    arrays = read_layers(path)
    features = dense_weights(arrays, 0).shape[0]
    return Model(NAME, path, "npz", arrays, inputs=(TensorSpec("x", (None, features), "float32"),))


@hookimpl
def compressor_compress(model: Model, step: Step, context: Context) -> Model:
    import numpy as np

    arrays = dict(model.handle)
    for index in range(layer_count(arrays)):
        weights = dense_weights(arrays, index)
        for key in (f"W{index}", f"W{index}__q", f"W{index}__scale"):
            arrays.pop(key, None)
        if step.technique == "prune":
            threshold = np.quantile(np.abs(weights), step.params["sparsity"])
            arrays[f"W{index}"] = np.where(np.abs(weights) <= threshold, 0, weights).astype(np.float32)
        elif step.mode == "fp16":
            arrays[f"W{index}"] = weights.astype(np.float16)
        else:
            scale = np.maximum(np.abs(weights).max(axis=0, keepdims=True), 1e-12) / 127.0
            arrays[f"W{index}__q"] = np.round(weights / scale).astype(np.int8)
            arrays[f"W{index}__scale"] = scale.astype(np.float32)
    return Model(NAME, model.source, "npz", arrays, model.inputs, list(model.notes))


@hookimpl
def compressor_save(model: Model, destination: Path, context: Context) -> Artifact:
    import numpy as np

    path = destination.with_suffix(SUFFIX)
    np.savez(path, **model.handle)
    return Artifact(NAME, path, "npz")


def forward(layers: list[tuple[Any, Any]], x: Any) -> Any:
    import numpy as np

    for index, (weights, bias) in enumerate(layers):
        x = x @ weights + bias
        if index < len(layers) - 1:
            x = np.maximum(x, 0)
    return x


class MlpRuntime(Runtime):
    """A saved archive, ready to run: core feeds it, times it and compares its outputs."""

    def __init__(self, path: Path) -> None:
        import numpy as np

        arrays = read_layers(path)
        self.layers = [(dense_weights(arrays, i), arrays[f"b{i}"].astype(np.float32))
                       for i in range(layer_count(arrays))]
        self.inputs = (TensorSpec("x", (None, self.layers[0][0].shape[0]), "float32"),)
        self.outputs = (TensorSpec("logits", (None, self.layers[-1][0].shape[1]), "float32"),)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        return {"logits": forward(self.layers, feeds["x"])}


@hookimpl
def compressor_open_runtime(artifact: Artifact, settings: MeasureSettings) -> Runtime:
    return MlpRuntime(artifact.path)


@hookimpl
def compressor_fork(model: Model, context: Context) -> Model:
    # compress replaces arrays and never changes them in place: variants can share the load.
    return Model(NAME, model.source, "npz", dict(model.handle), model.inputs, list(model.notes))


@hookimpl
def compressor_sample_models(directory: Path) -> list[SampleModel]:
    import numpy as np

    rng = np.random.default_rng(0)
    sizes = [64, 256, 256, 10]
    arrays = {}
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        arrays[f"W{i}"] = (rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        arrays[f"b{i}"] = np.zeros(n_out, np.float32)
    model = directory / "mlp.npz"
    np.savez(model, **arrays)
    x = rng.normal(size=(500, 64)).astype(np.float32)
    layers = [(arrays[f"W{i}"], arrays[f"b{i}"]) for i in range(3)]
    np.savez(directory / "eval.npz", x=x, y=forward(layers, x).argmax(1))
    return [
        SampleModel(NAME, "mlp", model, (("quantize fp16",), ("quantize dynamic",), ("prune 0.5",)),
                    eval_data=directory / "eval.npz", description="64-256-256-10 MLP")
    ]
