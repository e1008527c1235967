"""A tiny pure-Python backend used to test core without any ML framework.

A ``.toy`` file is JSON: ``{"weights": [[...] * classes] * features, "bias": [...]}``;
the model predicts ``argmax(x @ weights + bias)``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from compressor import (
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

NAME = "toy"


@hookimpl
def compressor_backends():
    yield Backend(
        name=NAME,
        description="pure-Python linear classifier (test fixture)",
        formats=(".toy",),
        techniques={
            "quantize": Technique(
                "quantize",
                modes=("fp16", "dynamic", "int8"),
                params={"bits": Param(int, 8, "integer bits", minimum=2, maximum=8)},
                requires_data={"int8": "calibration"},
            ),
            "prune": Technique(
                "prune",
                params={
                    "sparsity": Param(
                        float, None, "share of weights set to zero", minimum=0, maximum=1, required=True
                    ),
                    "epochs": Param(int, 0, "fine-tuning epochs", minimum=0),
                },
            ),
        },
        options={"scale": Param(float, 1.0, "multiply the inputs by this")},
        requires=("json",),
        default_variants=(("quantize fp16",), ("quantize dynamic",)),
    )


@hookimpl
def compressor_identify(path: Path):
    return NAME if path.suffix == ".toy" else None


def read_toy(path: Path) -> dict:
    try:
        document = json.loads(path.read_text())
        weights, bias = document["weights"], document["bias"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"not a toy model ({type(error).__name__})", path) from None
    if not weights or any(len(row) != len(bias) for row in weights):
        raise InvalidInputError("weights and bias do not fit", path)
    return {"weights": weights, "bias": bias}


@hookimpl
def compressor_load(path: Path, backend: str, context: Context):
    handle = read_toy(path)
    features = len(handle["weights"])
    return Model(NAME, path, "toy", handle, inputs=(TensorSpec("x", (None, features), "float32"),))


def _fp16(value: float) -> float:
    return struct.unpack("e", struct.pack("e", value))[0]


@hookimpl
def compressor_compress(model: Model, step: Step, context: Context):
    weights = [list(row) for row in model.handle["weights"]]
    notes = list(model.notes)
    if step.technique == "quantize":
        if step.mode == "fp16":
            weights = [[_fp16(w) for w in row] for row in weights]
        else:
            levels = 2 ** (step.params.get("bits", 8) - 1) - 1
            scale = max(abs(w) for row in weights for w in row) / levels or 1.0
            weights = [[round(w / scale) * scale for w in row] for row in weights]
    elif step.technique == "prune":
        flat = sorted(abs(w) for row in weights for w in row)
        cut = flat[int(step.params["sparsity"] * len(flat)) - 1] if step.params["sparsity"] > 0 else -1
        weights = [[0.0 if abs(w) <= cut else w for w in row] for row in weights]
        if not context.train_data:
            notes.append("pruned one-shot (no training data)")
    return Model(NAME, model.source, "toy", {"weights": weights, "bias": model.handle["bias"]},
                 model.inputs, notes, dict(model.metadata))


@hookimpl
def compressor_save(model: Model, destination: Path, context: Context):
    path = destination.with_suffix(".toy")
    path.write_text(json.dumps(model.handle))
    return Artifact(NAME, path, "toy")


def predict(handle: dict, rows) -> list[int]:
    weights, bias = handle["weights"], handle["bias"]
    out = []
    for row in rows:
        scores = [
            sum(x * weights[i][j] for i, x in enumerate(row)) + bias[j] for j in range(len(bias))
        ]
        out.append(max(range(len(scores)), key=scores.__getitem__))
    return out


class ToyRuntime(Runtime):
    """A saved toy model, run by core: rows of ``x`` in, each row's predicted class out (an
    integer label, which core compares as a classifier's top-1)."""

    def __init__(self, path: Path) -> None:
        self.handle = read_toy(path)
        self.inputs = (TensorSpec("x", (None, len(self.handle["weights"])), "float32"),)
        self.outputs = (TensorSpec("label", (None,), "int64"),)

    def run(self, feeds):
        import numpy as np

        return {"label": np.asarray(predict(self.handle, feeds["x"].tolist()), dtype=np.int64)}


@hookimpl
def compressor_open_runtime(artifact: Artifact, settings: MeasureSettings):
    return ToyRuntime(artifact.path)


@hookimpl
def compressor_sample_models(directory: Path):
    import numpy as np

    rng = np.random.default_rng(0)
    weights = rng.normal(size=(8, 3))
    x = rng.normal(size=(64, 8)).astype("float32")
    y = (x @ weights).argmax(1)
    model = directory / "sample.toy"
    model.write_text(json.dumps({"weights": weights.tolist(), "bias": [0.0, 0.0, 0.0]}))
    np.savez(directory / "eval.npz", x=x, y=y)
    yield SampleModel(NAME, "linear", model, (("quantize fp16",), ("prune 0.5",)),
                      eval_data=directory / "eval.npz", description="8x3 linear classifier")
