"""A NumPy backend that counts its work: every fork and every compress call is recorded in
:data:`CALLS`, so tests can tell how often a shared step was computed.

A ``.count`` file is the ``.npz`` of search_backend's ``.dial`` (``w``: features x
classes); artifacts are saved in the dial layout (float32) and run by its runtime.
``prune S`` zeroes the smallest weights (``S >= 1`` raises, as a broken plugin would;
its ``epochs`` parameter, default 1, changes nothing but the step's identity),
``quantize fp16|int8`` rounds them; each step adds a note and metadata, as real
backends do. Setting :data:`FORKS` to False makes ``compressor_fork`` return None
(a backend without forks: each variant's prefix is made again), to "loaded only", a fork
that raises on a changed model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from search_backend import DialRuntime

from compressor.plugin import (
    ORDER,
    PRUNE_OPTION,
    QUANTIZE_OPTION,
    Artifact,
    Backend,
    Context,
    Model,
    Param,
    Step,
    Technique,
    TensorSpec,
    hookimpl,
)

NAME = "counting"
#: ("fork", steps so far) and ("compress", str(step), steps so far), in call order.
CALLS: list[tuple[str, ...]] = []
#: False: ``compressor_fork`` returns None (the model is loaded again for each variant);
#: "loaded only": it raises on a model that steps changed (a fork written for loaded models).
FORKS: bool | str = True


@hookimpl
def compressor_backends():
    yield Backend(
        name=NAME, description="counts its forks and steps", formats=(".count",),
        techniques={
            "prune": Technique("prune", params={
                "sparsity": Param(float, None, "share of zeros", minimum=0, maximum=1, required=True),
                "epochs": Param(int, 1, "fine-tuning epochs (changes nothing here)", minimum=0)},
                positional="sparsity", cli=PRUNE_OPTION, order=ORDER["prune"]),
            "quantize": Technique("quantize", modes=("fp16", "int8"), cli=QUANTIZE_OPTION,
                                  order=ORDER["quantize"]),
        },
        requires=("numpy",), runtime_imports=("numpy",),
    )


@hookimpl
def compressor_identify(path: Path):
    return NAME if path.suffix == ".count" else None


@hookimpl
def compressor_load(path: Path, backend: str, context: Context):
    with np.load(path) as archive:
        weights = archive["w"].astype(np.float32)
    return Model(NAME, path, "count", {"w": weights, "steps": ()},
                 inputs=(TensorSpec("x", (None, weights.shape[0]), "float32"),))


@hookimpl
def compressor_fork(model: Model, context: Context):
    if not FORKS:
        return None
    if FORKS == "loaded only" and model.handle["steps"]:
        raise TypeError("cannot fork a changed model")
    CALLS.append(("fork", *model.handle["steps"]))
    return Model(NAME, model.source, "count", dict(model.handle), model.inputs, list(model.notes),
                 dict(model.metadata))


@hookimpl
def compressor_compress(model: Model, step: Step, context: Context):
    CALLS.append(("compress", str(step), *model.handle["steps"]))
    weights = model.handle["w"].copy()
    if step.technique == "prune":
        sparsity = step.params["sparsity"]
        if sparsity >= 1:
            raise ValueError("pruning every weight leaves nothing")
        weights[np.abs(weights) <= np.quantile(np.abs(weights), sparsity)] = 0
        metadata = {"pruned": sparsity, "epochs": step.params["epochs"]}
    elif step.mode == "fp16":
        weights = weights.astype(np.float16).astype(np.float32)
        metadata = {"precision": "fp16"}
    else:
        scale = np.abs(weights).max() / 127
        weights = np.round(weights / scale) * scale
        metadata = {"precision": "int8", "scale": float(scale)}
    return Model(NAME, model.source, "count", {"w": weights, "steps": (*model.handle["steps"], str(step))},
                 model.inputs, [*model.notes, f"{step} applied after {len(model.handle['steps'])} steps"],
                 {**model.metadata, **metadata})


@hookimpl
def compressor_save(model: Model, destination: Path, context: Context):
    weights = model.handle["w"]
    flat = weights.reshape(-1)
    index = np.flatnonzero(flat).astype(np.uint16)
    path = destination.with_suffix(".dial")
    with path.open("wb") as stream:
        np.savez(stream, shape=np.array(weights.shape), index=index, values=flat[index].astype(np.float32))
    return Artifact(NAME, path, "dial", notes=("saved as dial",), metadata={"saved_steps": len(model.handle["steps"])})


@hookimpl
def compressor_open_runtime(artifact: Artifact, settings: object):
    return DialRuntime(artifact.path)


def write_count(folder: Path, features: int = 16, classes: int = 4, rows: int = 40) -> dict[str, Path]:
    """A ``.count`` model and its eval data (labels: the model's own answers)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    weights = rng.normal(size=(features, classes)).astype(np.float32)
    model = folder / "model.count"
    with model.open("wb") as stream:
        np.savez(stream, w=weights)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    data = folder / "eval.npz"
    np.savez(data, x=x, y=(x @ weights).argmax(1))
    return {"model": model, "data": data}
