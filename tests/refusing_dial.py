"""A second backend over .dial files whose plugin refuses ``prune`` for the loaded model
(as the tflite backend refuses it for a PyTorch model) in ``compressor_check_steps``,
and whose ``quantize int8`` needs ``--calibration-data`` (for tests/test_plan_first.py)."""

from __future__ import annotations

import dataclasses

import search_backend

from compressor import Artifact, Backend, UsageError, hookimpl

NAME = "dialx"


@hookimpl
def compressor_backends():
    declared = next(iter(search_backend.compressor_backends()))
    quantize = dataclasses.replace(declared.techniques["quantize"], requires_data={"int8": "calibration"})
    yield Backend(name=NAME, description="dial files that take no prune", formats=(".dial",),
                  techniques={"quantize": quantize, "prune": declared.techniques["prune"]},
                  requires=("numpy",), runtime_imports=("numpy",))


@hookimpl
def compressor_load(path, backend, context):
    model = search_backend.compressor_load(path, backend, context)
    model.backend = NAME
    return model


@hookimpl
def compressor_check_steps(model, steps, context):
    for step in steps:
        if step.technique == "prune":
            raise UsageError(f"'{step}' is not available for this model on backend {NAME!r}; use --backend dial")


@hookimpl
def compressor_compress(model, step, context):
    compressed = search_backend.compressor_compress(model, step, context)
    compressed.backend = NAME
    return compressed


@hookimpl
def compressor_save(model, destination, context):
    artifact = search_backend.compressor_save(model, destination, context)
    return Artifact(NAME, artifact.path, artifact.format)


@hookimpl
def compressor_open_runtime(artifact, settings):
    return search_backend.DialRuntime(artifact.path)
