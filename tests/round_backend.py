"""A third party's backend with a technique of its own, ``round``, declared the way the
built-in ones are: a bare value (``round 2``: decimals), a ``compressor run`` option
(``--round N``, one variant per value), a disk-size share and an order among steps.

A ``.round`` file is the ``.npz`` of search_backend's ``.dial`` (``w``: features x classes);
artifacts are saved in the dial layout and run by its runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from search_backend import DialRuntime

from compressor.plugin import (
    ORDER,
    PRUNE_OPTION,
    Artifact,
    Backend,
    CliFlag,
    Context,
    Model,
    Param,
    Step,
    Technique,
    TensorSpec,
    hookimpl,
)

NAME = "round"
ROUND = Technique(
    "round", help="weights rounded to N decimals", params={"decimals": Param(int, None, "decimals kept", minimum=0)},
    positional="decimals", cli=CliFlag("--round", metavar="N", help="Round weights to N decimals.", type=int,
                                       minimum=0, repeat=True),
    size_factor=0.25, order=5, candidates=("round 2", "round 1"),
)


@hookimpl
def compressor_backends():
    yield Backend(
        name=NAME, description="weights rounded to fewer decimals (a third party's technique)", formats=(".round",),
        techniques={"round": ROUND,
                    "prune": Technique("prune", params={"sparsity": Param(float, None, "share of zeros", minimum=0,
                                                                          maximum=1, required=True)},
                                       positional="sparsity", cli=PRUNE_OPTION, order=ORDER["prune"],
                                       candidates=("prune 0.5",))},
        requires=("numpy",), runtime_imports=("numpy",),
    )


@hookimpl
def compressor_identify(path: Path):
    return NAME if path.suffix == ".round" else None


@hookimpl
def compressor_load(path: Path, backend: str, context: Context):
    with np.load(path) as archive:
        weights = archive["w"].astype(np.float32)
    return Model(NAME, path, "round", {"w": weights, "steps": ()},
                 inputs=(TensorSpec("x", (None, weights.shape[0]), "float32"),))


@hookimpl
def compressor_fork(model: Model, context: Context):
    return Model(NAME, model.source, "round", dict(model.handle), model.inputs)


@hookimpl
def compressor_compress(model: Model, step: Step, context: Context):
    weights = model.handle["w"].copy()
    if step.technique == "round":
        weights = np.round(weights, step.params["decimals"])
    else:
        weights[np.abs(weights) <= np.quantile(np.abs(weights), step.params["sparsity"])] = 0
    return Model(NAME, model.source, "round", {"w": weights, "steps": (*model.handle["steps"], str(step))},
                 model.inputs)


@hookimpl
def compressor_save(model: Model, destination: Path, context: Context):
    weights = model.handle["w"]
    flat = weights.reshape(-1)
    index = np.flatnonzero(flat).astype(np.uint16)
    path = destination.with_suffix(".dial")
    with path.open("wb") as stream:
        np.savez(stream, shape=np.array(weights.shape), index=index, values=flat[index])
    return Artifact(NAME, path, "dial", metadata={"steps applied": list(model.handle["steps"])})


@hookimpl
def compressor_open_runtime(artifact: Artifact, settings: object):
    return DialRuntime(artifact.path)
