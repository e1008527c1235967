"""Hook implementations of the ``onnx`` backend: PyTorch and ONNX models to
(quantized) ONNX, measured through ONNX Runtime.

PyTorch models are loaded, exported and trained by the PyTorch front end
(:mod:`compressor_frontends.pytorch`), which also declares the techniques this backend
shares with the torch backend. Importing this module imports no framework; every hook
imports what it needs.
Models past the large-model threshold (``COMPRESSOR_LARGE_MODEL_BYTES``) stay
ONNX files on disk between steps (``large.py``); steps never modify the Model
they are given, so forks of one loaded model share its graph and its export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compressor.plugin import (
    EVERY_STEP,
    GENERATION_OPTIONS,
    Artifact,
    Backend,
    CompressionError,
    Context,
    Dataset,
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
from compressor_frontends.pytorch.loading import is_transformers_folder
from compressor_frontends.pytorch.techniques import (
    DISTILL,
    PRUNE_PARAMS,
    QAT_PARAMS,
    lowrank_technique,
    text_options,
)
from compressor_onnx.genai import GENAI_FORMAT, export_technique
from compressor_onnx.network import ExportCache, Network

NAME = "onnx"
IDENTIFIED_SUFFIXES = (".onnx", ".pt2", ".pt", ".pth", ".safetensors", ".jit", ".ts", ".ptl")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def backend() -> Backend:
    quantize_params = {
        "per_channel": Param(bool, True, "one scale per output channel (measured: better accuracy); static "
                             "int8 of a non-transformer graph tries both unless set"),
        "calibration_method": Param(str, "minmax", "static calibration; a non-transformer graph tries all three "
                                    "unless set", choices=CALIBRATION_METHODS),
        "calibration_samples": Param(int, 128, "calibration examples used", minimum=1),
        "exclude_nodes": Param(str, "", "comma-separated node names kept float"),
        "exclude_op_types": Param(str, "", "comma-separated op types kept float, e.g. Gather"),
        "reduce_range": Param(str, "auto", "7-bit weights for int8 modes; auto: on x86 without VNNI/AMX",
                              choices=("auto", "true", "false")),
        "model_type": Param(str, "auto", "static int8/uint8: transformer path (auto: detected from the graph)",
                            choices=("auto", "transformer", "generic")),
        "alpha": Param(float, 0.8, "SmoothQuant strength of the transformer static path (0 = off)",
                       minimum=0, maximum=1),
        "block_size": Param(str, "32", "int4: weights per scale (a power of two)",
                            choices=("16", "32", "64", "128", "256")),
        "symmetric": Param(bool, False, "int4: symmetric blocks (no zero points)"),
        "algorithm": Param(str, "rtn", "int4: rtn, hqq, gptq or awq (both need --calibration-data)",
                           choices=("rtn", "hqq", "gptq", "awq")),
        "accuracy_level": Param(int, 4, "int4: MatMulNBits compute (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8)",
                                minimum=0, maximum=4),
    }
    return Backend(
        name=NAME,
        description="PyTorch and ONNX models to (quantized) ONNX, run by ONNX Runtime",
        formats=(*IDENTIFIED_SUFFIXES, ".bin", "transformers folder",
                 "Keras (.keras, .h5, SavedModel folder) with --backend onnx"),
        techniques={
            "quantize": Technique(
                "quantize",
                help="ONNX Runtime quantization: dynamic int8, static QDQ int8/uint8, weight-only int4, fp16",
                modes=("fp16", "dynamic", "int8", "uint8", "int4"),
                params=quantize_params,
                requires_data={"int8": "calibration", "uint8": "calibration"},
                # Mildest first: search rules out what follows one that broke the budget.
                candidates=("quantize fp16", "quantize dynamic", "quantize int8", "quantize int4"),
            ),
            "prune": Technique(
                "prune",
                help="per-layer magnitude pruning (real zeros), whole output neurons/filters (structure=channel), "
                     "or transformers attention heads ranked on the data (structure=head); fine-tuned on "
                     "--train-data",
                params=PRUNE_PARAMS,
                candidates=("prune 0.25 structure=channel", "prune 0.5 structure=channel",
                            "prune 0.75 structure=channel"),
            ),
            "lowrank": lowrank_technique("MatMul/Gemm weights as two thin MatMuls from a truncated SVD"),
            "distill": DISTILL,
            "qat": Technique(
                "qat",
                help="quantization-aware training of the torch model on --train-data, exported as a QDQ "
                     "int8 graph",
                params=QAT_PARAMS,
                requires_data={EVERY_STEP: "train"},
            ),
            "export": export_technique(),
        },
        options={
            "model_factory": Param(str, None, "package.module:function building the nn.Module for a state_dict"),
            "input_shape": Param(str, None, "example input shapes, e.g. 1,64 or input_ids:1,128:int64;attention_mask:1,128:int64"),
            "opset": Param(int, 17, "ONNX opset of exported graphs", minimum=13, maximum=21),
            "kv_cache": Param(bool, True, "transformers causal LMs: export with past key/values (one graph for "
                              "prefill and decode), measured generating; false: one pass without a cache"),
            **GENERATION_OPTIONS,
            **text_options(),
        },
        extra="onnx",
        requires=("onnxruntime", "onnx", "torch"),
        runtime_imports=("onnxruntime",),
        distributions=("torch", "onnx", "onnxruntime", "transformers"),
        default_variants=(("quantize dynamic",), ("quantize fp16",)),
    )


@hookimpl
def compressor_backends() -> Iterator[Backend]:
    yield backend()


@hookimpl
def compressor_identify(path: Path) -> str | None:
    if path.is_dir():
        return NAME if is_transformers_folder(path) else None
    return NAME if path.suffix.lower() in IDENTIFIED_SUFFIXES else None


@hookimpl
def compressor_load(path: Path, backend: str, context: Context) -> Model:
    from compressor_onnx.loading import load_network

    network, inputs = load_network(path, context.options, context.trust)
    if network.is_torch and network.export is None and network.torch is not None:
        # Forks share this cache: the torch model is exported once, then dropped.
        network.export = ExportCache(network.torch.module, network.torch.exported_program, holders=[network])
    return Model(NAME, path, _format(network), network, inputs, source_bytes=network.source_bytes)


@hookimpl
def compressor_load_data(path: Path, purpose: str, inputs: tuple[TensorSpec, ...], limit: int | None,
                         model_path: Path | None, context: Context | None) -> Dataset | None:
    """Text (``.txt``, ``.jsonl``) tokenized with the model's tokenizer; core reads ``.npz``."""
    from compressor_frontends.pytorch.text_data import text_dataset

    return text_dataset(path, purpose, inputs, limit, model_path, context)


@hookimpl
def compressor_fork(model: Model, context: Context) -> Model:
    """Steps never modify a Network, so a fork shares the loaded graph, file and export."""
    if model.format == GENAI_FORMAT:  # an export genai plan: immutable
        return Model(NAME, model.source, model.format, model.handle, model.inputs, list(model.notes),
                     dict(model.metadata))
    network: Network = model.handle
    if network.export is not None and network.torch is not None:
        network = dataclasses.replace(network, torch=network.torch.without_weights())
    else:
        network = dataclasses.replace(network)
    return Model(NAME, model.source, model.format, network, model.inputs, list(model.notes), dict(model.metadata))


def _format(network: Network) -> str:
    """What the handle holds right now: a torch model awaiting export, or an ONNX graph."""
    return "torch" if network.is_torch else "onnx"


@hookimpl
def compressor_check_steps(model: Model, steps: list[Step], context: Context) -> None:
    """What the declaration cannot say, refused before anything is exported (:mod:`compressor_onnx.step_checks`)."""
    from compressor_onnx.genai import check_export_steps
    from compressor_onnx.step_checks import check_steps

    check_steps(model, check_export_steps(model, steps), context)


@hookimpl
def compressor_compress(model: Model, step: Step, context: Context) -> Model | None:
    if step.technique == "export" or model.format == GENAI_FORMAT:
        from compressor_onnx.genai import genai_step

        return genai_step(model, step, context)
    if step.technique not in ("prune", "quantize", "lowrank", "distill", "qat"):
        return None
    if step.technique in ("distill", "qat") or step.params.get("structure") == "head":
        return _torch_step(model, step, context)
    from compressor_onnx.export import exported
    from compressor_onnx.qat import refuse_after_qat

    refuse_after_qat(model, step)

    if step.technique == "quantize":
        from compressor_onnx.quantization import check_quantize_step

        check_quantize_step(step, context)
    network = exported(model.handle, context)
    notes, metadata = list(model.notes), {**model.metadata, **_export_facts(network)}
    if step.technique == "quantize":
        from compressor_onnx.quantization import quantize_network

        network, step_notes, step_metadata = quantize_network(network, step, context)
        metadata["quantization"] = [*metadata.get("quantization", []), str(step)]
    else:
        network, step_notes, step_metadata = _edit(model, network, step, context)
    notes += step_notes
    metadata.update(step_metadata)
    return Model(NAME, model.source, _format(network), network, model.inputs, notes, metadata)


def _edit(model: Model, original: Network, step: Step, context: Context) -> tuple[Network, list[str], dict]:
    """``lowrank`` or ``prune`` (unstructured or channel) on the exported graph, then
    fine-tuned on the torch model when there is train data."""
    from compressor_frontends.pytorch.finetune import fine_tuning_wanted, one_shot_note
    from compressor_onnx.finetune import finetune_graph_edit

    def edit(network: Network) -> tuple[Network, list[str], dict[str, Any], Any]:
        if step.technique == "lowrank" or step.params.get("structure") == "channel":
            from compressor_onnx.graph_steps import apply_step

            return apply_step(network, step, context)
        sparsity = float(step.params["sparsity"])
        network, layers = _prune(network, sparsity, context)
        if layers == 0:
            raise CompressionError("no Linear/Conv (MatMul/Gemm/Conv) weights to prune")
        return (network, [f"pruned {sparsity:g} of the weights of {layers} layers by magnitude"],
                {"pruned_layers": layers}, None)

    edited, notes, metadata, result = edit(original)
    if not fine_tuning_wanted(step, context):
        return edited, [*notes, one_shot_note(step, context)], metadata
    edited, more_notes, more_metadata = finetune_graph_edit(
        model, original, edited, result, step, context, redo=lambda network: edit(network)[0])
    return edited, [*notes, *more_notes], {**metadata, **more_metadata}


def _torch_step(model: Model, step: Step, context: Context) -> Model:
    """``distill``, ``qat`` and ``prune structure=head``: on the torch model, before export
    (:mod:`compressor_onnx.torch_steps`)."""
    if step.technique == "distill":
        from compressor_onnx.torch_steps import distill_step

        network, notes, metadata = distill_step(model, step, context)
    elif step.technique == "qat":
        from compressor_onnx.qat import qat

        network, notes, metadata = qat(model, step, context)
    else:
        from compressor_onnx.torch_steps import prune_heads_step

        network, notes, metadata = prune_heads_step(model, step, context)
    return Model(NAME, model.source, _format(network), network, model.inputs,
                 [*model.notes, *notes], {**model.metadata, **metadata})


def _prune(network: Network, sparsity: float, context: Context) -> tuple[Network, int]:
    if network.path is not None:
        from compressor_onnx.large import prune_large

        path, layers = prune_large(network.path, sparsity, context)
        return dataclasses.replace(network, path=path), layers
    from compressor_onnx.pruning import prune_graph

    graph, layers = prune_graph(network.graph, sparsity)
    return dataclasses.replace(network, graph=graph), layers


def _export_facts(network: Network) -> dict[str, object]:
    return dict(network.export.metadata) if network.export is not None else {}


@hookimpl
def compressor_save(model: Model, destination: Path, context: Context) -> Artifact:
    if model.format == GENAI_FORMAT:
        from compressor_onnx.genai_build import save_genai

        return save_genai(model.handle, destination, context)
    from compressor_onnx.export import exported
    from compressor_onnx.saving import save_network

    network = exported(model.handle, context)
    artifact, metadata = save_network(network, destination.with_suffix(".onnx"), context.progress)
    return dataclasses.replace(artifact, metadata={**_export_facts(network), **metadata})


@hookimpl
def compressor_open_runtime(artifact: Artifact, settings: MeasureSettings) -> Runtime:
    if artifact.format == GENAI_FORMAT:
        from compressor_onnx.genai_runtime import GenaiRuntime

        return GenaiRuntime(artifact, settings)
    from compressor_onnx.runtime import OnnxRuntime

    return OnnxRuntime(artifact, settings)


@hookimpl
def compressor_sample_models(directory: Path) -> Iterator[SampleModel]:
    from compressor_onnx.samples import FACTORY, write_digits_sample

    weights, eval_data, calibration = write_digits_sample(directory)
    yield SampleModel(
        backend=NAME,
        name="digits-mlp",
        path=weights,
        variants=(("quantize fp16",), ("quantize dynamic",), ("quantize int8",),
                  ("prune 0.5", "quantize dynamic")),
        eval_data=eval_data,
        calibration_data=calibration,
        options={"model_factory": FACTORY},
        description="MLP (64-64-10) on scikit-learn digits, saved as a state_dict",
    )

