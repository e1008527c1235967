"""A deterministic NumPy backend for testing ``compressor search``: a linear classifier
whose prune and quantize steps really shrink its file and really change its answers.

A ``.dial`` file is an ``.npz`` with ``w`` (features x classes, float32). Saved
artifacts keep the nonzero weights only (values and their flat indices), as
float32, float16, int8 or two int4 codes per byte, so size follows the steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from compressor import (
    Artifact,
    Backend,
    CompressionError,
    Context,
    Model,
    Param,
    Step,
    Technique,
    TensorSpec,
    hookimpl,
)
from compressor.runtime import Runtime

NAME = "dial"
BITS = {"fp16": 16, "int8": 8, "int4": 4}


@hookimpl
def compressor_backends():
    yield Backend(
        name=NAME, description="linear classifier for search tests", formats=(".dial",),
        techniques={
            "prune": Technique("prune", params={"sparsity": Param(float, None, "share of zeros", minimum=0,
                                                                  maximum=1, required=True)},
                               candidates=("prune 0.25", "prune 0.5", "prune 0.75", "prune 0.9")),
            "quantize": Technique("quantize", modes=("fp16", "int8", "int4"),
                                  candidates=("quantize fp16", "quantize int8", "quantize int4")),
        },
        requires=("numpy",), runtime_imports=("numpy",),
    )


@hookimpl
def compressor_identify(path: Path):
    return NAME if path.suffix == ".dial" else None


@hookimpl
def compressor_load(path: Path, backend: str, context: Context):
    with np.load(path) as archive:
        weights = archive["w"].astype(np.float32)
    return Model(NAME, path, "dial", {"w": weights, "bits": 32},
                 inputs=(TensorSpec("x", (None, weights.shape[0]), "float32"),))


@hookimpl
def compressor_fork(model: Model, context: Context):
    return Model(NAME, model.source, "dial", dict(model.handle), model.inputs)


@hookimpl
def compressor_compress(model: Model, step: Step, context: Context):
    weights, bits = model.handle["w"].copy(), model.handle["bits"]
    if step.technique == "prune":
        if step.params["sparsity"] >= 1.0:
            raise CompressionError("pruning every weight leaves nothing")
        cut = np.quantile(np.abs(weights[weights != 0]), step.params["sparsity"])
        weights[np.abs(weights) <= cut] = 0
    else:
        bits = BITS[step.mode]
        if bits == 16:
            weights = weights.astype(np.float16).astype(np.float32)
        else:
            levels = 2 ** (bits - 1) - 1
            scale = np.abs(weights).max() / levels
            weights = np.round(weights / scale) * scale
    return Model(NAME, model.source, "dial", {"w": weights, "bits": bits}, model.inputs)


@hookimpl
def compressor_save(model: Model, destination: Path, context: Context):
    weights, bits = model.handle["w"], model.handle["bits"]
    flat = weights.reshape(-1)
    index = np.flatnonzero(flat).astype(np.uint16)
    values = flat[index]
    arrays: dict[str, Any] = {"shape": np.array(weights.shape), "index": index}
    if bits == 32:
        arrays["values"] = values.astype(np.float32)
    elif bits == 16:
        arrays["values"] = values.astype(np.float16)
    else:
        levels = 2 ** (bits - 1) - 1
        scale = np.abs(values).max() / levels if values.size else 1.0
        codes = np.round(values / scale).astype(np.int8)
        arrays["scale"] = np.array([scale], dtype=np.float32)
        arrays["codes"] = codes if bits == 8 else _pack4(codes)
        arrays["count"] = np.array([codes.size])
    path = destination.with_suffix(".dial")
    with path.open("wb") as stream:
        np.savez(stream, **arrays)
    return Artifact(NAME, path, "dial")


def _pack4(codes: Any) -> Any:
    nibbles = (codes.astype(np.int16) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, 0)
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _unpack4(packed: Any, count: int) -> Any:
    low, high = packed & 0x0F, packed >> 4
    nibbles = np.stack([low, high], axis=1).reshape(-1)[:count].astype(np.int16)
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.float32)


class DialRuntime(Runtime):
    def __init__(self, path: Path) -> None:
        with np.load(path) as archive:
            shape = tuple(archive["shape"])
            if "values" in archive:
                values = archive["values"].astype(np.float32)
            else:
                codes = archive["codes"]
                count = int(archive["count"][0])
                raw = codes.astype(np.float32) if codes.dtype == np.int8 else _unpack4(codes, count)
                values = raw * archive["scale"][0]
            flat = np.zeros(int(np.prod(shape)), dtype=np.float32)
            flat[archive["index"]] = values
        self.w = flat.reshape(shape)
        self.inputs = (TensorSpec("x", (None, shape[0]), "float32"),)
        self.outputs = (TensorSpec("logits", (None, shape[1]), "float32"),)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        return {"logits": feeds["x"] @ self.w}


@hookimpl
def compressor_open_runtime(artifact: Artifact, settings: object):
    return DialRuntime(artifact.path)


def write_dial(folder: Path, features: int = 64, classes: int = 10, rows: int = 300, seed: int = 0) -> dict[str, Path]:
    """A model whose answers survive mild compression and break under strong compression."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    weights = rng.normal(size=(features, classes)).astype(np.float32)
    model = folder / "model.dial"
    with model.open("wb") as stream:
        np.savez(stream, w=weights)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    data = folder / "eval.npz"
    np.savez(data, x=x, y=(x @ weights).argmax(1))
    return {"model": model, "data": data}
