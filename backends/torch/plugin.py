"""Hook implementations of the ``torch`` backend: stay in PyTorch.

PyTorch models (the same inputs the onnx backend reads, loaded by the PyTorch front
end, :mod:`compressor_frontends.pytorch`) compressed with PyTorch's own tools (torchao
quantization, magnitude pruning) and the front end's structured techniques
(``structured.py``: lowrank, channel and head pruning, distillation, fine-tuning),
saved as ``torch.export`` programs and measured by PyTorch on the CPU.

The backend claims no file suffix of its own but its manifest's
(``.torch.json``): the onnx backend already claims PyTorch files, so this one
is chosen with ``--backend torch`` (or ``--backend onnx,torch`` to compare).
Importing this module imports no framework; every hook imports what it needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

from compressor.plugin import (
    Artifact,
    Backend,
    Context,
    Dataset,
    MeasureSettings,
    Model,
    Param,
    Runtime,
    Step,
    Technique,
    TensorSpec,
    hookimpl,
)

# The PyTorch front end's declarations of the techniques the onnx and torch backends offer: one vocabulary.
from compressor_frontends.pytorch.techniques import (
    DISTILL,
    PRUNE_PARAMS,
    lowrank_technique,
    text_options,
)

NAME = "torch"


def backend() -> Backend:
    return Backend(
        name=NAME,
        description="PyTorch models compressed with PyTorch's own tools (torchao), run by PyTorch",
        formats=(".pt", ".pth", ".bin", ".safetensors", ".pt2", "transformers folder",
                 ".safetensors + .torch.json"),
        techniques={
            "quantize": Technique(
                "quantize",
                help="torchao: dynamic int8 (int8 weights and activations) or int8 weight-only "
                     "nn.Linear; fp16 parameters",
                modes=("fp16", "dynamic", "int8"),
                candidates=("quantize fp16", "quantize int8", "quantize dynamic"),
            ),
            "prune": Technique(
                "prune",
                help="per-layer magnitude pruning of Linear/Conv weights, made permanent (real zeros); whole "
                     "output neurons/filters (structure=channel) or transformers attention heads ranked on "
                     "the data (structure=head), the modules really sliced; fine-tuned on --train-data",
                params=PRUNE_PARAMS,
                candidates=("prune 0.25", "prune 0.5", "prune 0.75"),
            ),
            "lowrank": lowrank_technique("nn.Linear layers as two thin Linear layers from a truncated SVD"),
            "distill": DISTILL,
        },
        options={
            "model_factory": Param(str, None, "package.module:function building the nn.Module for a state_dict"),
            "input_shape": Param(str, None, "example input shapes, e.g. 1,64 or input_ids:1,128:int64;attention_mask:1,128:int64"),
            "save_format": Param(str, "auto", "auto: torch.export .pt2, else safetensors + manifest",
                                 choices=("auto", "pt2", "safetensors")),
            **text_options(),
        },
        extra="torch",
        requires=("torch", "safetensors"),
        runtime_imports=("torch", "torch._export.serde.serialize"),
        distributions=("torch", "torchao", "transformers"),
        default_variants=(("quantize dynamic",), ("quantize fp16",)),
    )


@hookimpl
def compressor_backends() -> Iterator[Backend]:
    yield backend()


@hookimpl
def compressor_identify(path: Path) -> str | None:
    from compressor_torch.loading import MANIFEST_SUFFIX

    return NAME if path.name.endswith(MANIFEST_SUFFIX) else None


@hookimpl
def compressor_load(path: Path, backend: str, context: Context) -> Model:
    from compressor_torch.loading import MANIFEST_SUFFIX, load_net

    if path.name.endswith(MANIFEST_SUFFIX):
        path = path.with_name(path.name.removesuffix(MANIFEST_SUFFIX) + ".safetensors")
    net, inputs = load_net(path, context.options, context.trust)
    return Model(NAME, path, "torch", net, inputs, metadata={"quantization": list(net.quantization)}
                 if net.quantization else {})


@hookimpl
def compressor_load_data(path: Path, purpose: str, inputs: tuple[TensorSpec, ...], limit: int | None,
                         model_path: Path | None, context: Context | None) -> Dataset | None:
    """Text (``.txt``, ``.jsonl``) tokenized as on the onnx backend; core reads ``.npz``."""
    from compressor_frontends.pytorch.text_data import text_dataset

    return text_dataset(path, purpose, inputs, limit, model_path, context)


@hookimpl
def compressor_fork(model: Model, context: Context) -> Model:
    return Model(NAME, model.source, model.format, model.handle.fork(), model.inputs,
                 list(model.notes), dict(model.metadata))


@hookimpl
def compressor_check_steps(model: Model, steps: list[Step], context: Context) -> None:
    """Refused before any work: torchao's modes without torchao, fp16 of a ``.pt2`` program,
    a second quantize; what distill and head pruning refuse before training."""
    from compressor_frontends.pytorch.techniques import check_torch_step
    from compressor_torch.quantize import check_quantize_steps
    from compressor_torch.structured import check_step

    check_quantize_steps(model.handle, steps)
    quantized = False
    for step in steps:
        if step.technique == "distill" or step.params.get("structure") == "head":
            check_torch_step(step, model.handle.module, context, model.source)
        if step.technique in ("prune", "lowrank", "distill"):
            check_step(model, step, context, after_quantize=quantized)
        quantized = quantized or step.technique == "quantize"


@hookimpl
def compressor_compress(model: Model, step: Step, context: Context) -> Model | None:
    from compressor.plugin import CompressionError
    from compressor_torch.quantize import quantize

    net = model.handle
    notes, metadata = list(model.notes), dict(model.metadata)
    if step.technique in ("prune", "lowrank", "distill"):
        from compressor_torch.structured import apply

        net, step_notes, step_metadata = apply(model, step, context)
        notes += step_notes
        metadata.update(step_metadata)
    elif step.technique == "quantize":
        if step.mode not in ("fp16", "dynamic", "int8"):
            raise CompressionError(f"quantize {step.mode} is not a torch backend mode")
        net, step_notes, step_metadata = quantize(net, str(step.mode))
        notes += step_notes
        metadata.update(step_metadata)
        metadata["quantization"] = [*metadata.get("quantization", []), str(step)]
    else:
        return None
    return Model(NAME, model.source, "torch", net, model.inputs, notes, metadata)


@hookimpl
def compressor_save(model: Model, destination: Path, context: Context) -> Artifact:
    from compressor_torch.saving import save_net

    artifact, facts, notes = save_net(model.handle, destination, context)
    return dataclasses.replace(artifact, metadata=facts, notes=tuple(notes))


@hookimpl
def compressor_open_runtime(artifact: Artifact, settings: MeasureSettings) -> Runtime:
    from compressor_torch.runtime import TorchRuntime

    return TorchRuntime(artifact, settings)
