"""A second backend over .dial files whose runtime computes in float16 (for test_multirun)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import search_backend

from compressor import Artifact, Backend, hookimpl

NAME = "dial2"


@hookimpl
def compressor_backends():
    declared = next(iter(search_backend.compressor_backends()))
    yield Backend(name=NAME, description="dial files in float16", formats=(".dial",),
                  techniques=declared.techniques, requires=("numpy",), runtime_imports=("numpy",))


@hookimpl
def compressor_load(path, backend, context):
    model = search_backend.compressor_load(path, backend, context)
    model.backend = NAME
    return model


@hookimpl
def compressor_fork(model, context):
    return search_backend.compressor_fork(model, context)


@hookimpl
def compressor_compress(model, step, context):
    compressed = search_backend.compressor_compress(model, step, context)
    compressed.backend = NAME
    return compressed


@hookimpl
def compressor_save(model, destination, context):
    artifact = search_backend.compressor_save(model, destination, context)
    return Artifact(NAME, artifact.path, artifact.format)


class HalfRuntime(search_backend.DialRuntime):
    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        half = feeds["x"].astype(np.float16) @ self.w.astype(np.float16)
        return {"logits": half.astype(np.float32)}


@hookimpl
def compressor_open_runtime(artifact, settings):
    return HalfRuntime(artifact.path)
