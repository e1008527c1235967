"""A NumPy backend measured by core through a Runtime (no framework): to test core's
measuring on the shapes real models have (several heads, scalar inputs, state).

A ``.heads`` file is JSON::

    {"w": [[...]] (features x hidden), "heads": {"logits": [[...]], "boxes": [[...]]},
     "scalar": false, "state": false, "max_abs": 1e9}

``max_abs`` makes the runtime refuse inputs beyond it, as a runtime refuses data it cannot take.

Outputs: one per head, ``x @ w @ head``; with ``"scalar": true`` an int64 input
``sr`` (one value for every call) scales the features by ``sr / 16000``; with
``"state": true`` an input ``state`` ``[1, batch, hidden]`` is added to the hidden
layer and returned, updated, as output ``state_out`` (batch on axis 1).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from compressor import Artifact, Backend, Context, Model, Step, Technique, TensorSpec, hookimpl
from compressor.runtime import Runtime

NAME = "heads"


@hookimpl
def compressor_backends():
    yield Backend(
        name=NAME, description="NumPy multi-head model (test fixture)", formats=(".heads",),
        techniques={"quantize": Technique("quantize", modes=("fp16", "dynamic"))},
        requires=("numpy",), runtime_imports=("numpy",),
    )


@hookimpl
def compressor_identify(path: Path):
    return NAME if path.suffix == ".heads" else None


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


@hookimpl
def compressor_load(path: Path, backend: str, context: Context):
    spec = read(path)
    features = len(spec["w"])
    inputs = [TensorSpec("x", (None, features), "float32")]
    if spec.get("scalar"):
        inputs.append(TensorSpec("sr", (), "int64"))
    if spec.get("state"):
        inputs.append(TensorSpec("state", (1, None, len(spec["w"][0])), "float32"))
    return Model(NAME, path, "heads", spec, inputs=tuple(inputs))


@hookimpl
def compressor_compress(model: Model, step: Step, context: Context):
    def rounded(values: Any) -> list[Any]:
        array = np.asarray(values, dtype=np.float64)
        if step.mode == "fp16":
            return array.astype(np.float16).astype(np.float64).tolist()
        scale = np.abs(array).max() / 7 or 1.0  # a coarse 4-bit grid: visibly lossy
        return (np.round(array / scale) * scale).tolist()

    spec = dict(model.handle)
    spec["w"] = rounded(spec["w"])
    spec["heads"] = {name: rounded(head) for name, head in spec["heads"].items()}
    return Model(NAME, model.source, "heads", spec, model.inputs)


@hookimpl
def compressor_save(model: Model, destination: Path, context: Context):
    path = destination.with_suffix(".heads")
    path.write_text(json.dumps(model.handle))
    return Artifact(NAME, path, "heads")


class HeadsRuntime(Runtime):
    def __init__(self, path: Path) -> None:
        spec = read(path)
        self.w = np.asarray(spec["w"], dtype=np.float32)
        self.heads = {name: np.asarray(head, dtype=np.float32) for name, head in spec["heads"].items()}
        self.scalar, self.state = bool(spec.get("scalar")), bool(spec.get("state"))
        self.max_abs = float(spec.get("max_abs", np.inf))
        hidden = self.w.shape[1]
        inputs = [TensorSpec("x", (None, self.w.shape[0]), "float32")]
        if self.scalar:
            inputs.append(TensorSpec("sr", (), "int64"))
        if self.state:
            inputs.append(TensorSpec("state", (1, None, hidden), "float32"))
        self.inputs = tuple(inputs)
        outputs = [TensorSpec(name, (None, head.shape[1]), "float32") for name, head in self.heads.items()]
        if self.state:
            outputs.append(TensorSpec("state_out", (1, None, hidden), "float32"))
        self.outputs = tuple(outputs)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        x = feeds["x"]
        if x.ndim != 2 or x.shape[1] != self.w.shape[0]:
            raise ValueError(f"x must be [N, {self.w.shape[0]}], got {list(x.shape)}")
        if np.abs(x).max() > self.max_abs:
            raise ValueError(f"values beyond {self.max_abs:g} overflow this runtime")
        if self.scalar:
            x = x * (float(feeds["sr"]) / 16000.0)
        hidden = x @ self.w
        result: dict[str, Any] = {}
        if self.state:
            hidden = hidden + feeds["state"][0]
            result["state_out"] = hidden[None, :, :] * 0.5
        for name, head in self.heads.items():
            result[name] = hidden @ head
        return result

    def metrics(self) -> dict[str, Any]:
        return {"runtime": "numpy"}


@hookimpl
def compressor_open_runtime(artifact: Artifact, settings: object):
    return HeadsRuntime(artifact.path)
