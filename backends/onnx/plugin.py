"""Hook implementations of the ``onnx`` backend: PyTorch and ONNX models to
(quantized) ONNX, measured through ONNX Runtime.

Importing this module imports no framework; every hook imports what it needs.
Models past the large-model threshold (``COMPRESSOR_LARGE_MODEL_BYTES``) stay
ONNX files on disk between steps (``large.py``); steps never modify the Model
they are given, so forks of one loaded model share its graph and its export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compressor import (
    EVERY_STEP,
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
from compressor_onnx.channels import STRUCTURES, Structure
from compressor_onnx.loading import ExportCache, Network, is_transformers_folder

NAME = "onnx"
IDENTIFIED_SUFFIXES = (".onnx", ".pt2", ".pt", ".pth", ".safetensors", ".jit", ".ts", ".ptl")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
#: Fine-tuning after prune and lowrank, on the torch model, when --train-data is given.
FINE_TUNING_PARAMS = {
    "epochs": Param(int, 2, "fine-tuning epochs on --train-data (0: one-shot)", minimum=0),
    "batch_size": Param(int, 32, "fine-tuning batch size", minimum=1),
    "learning_rate": Param(float, None, "fine-tuning AdamW learning rate (default 1e-3, transformers 5e-5)",
                           minimum=1e-8, maximum=1),
}
LOWRANK_PARAMS = {
    "rank": Param(int, None, "rank kept in every factorized layer (or energy=)", minimum=1),
    "energy": Param(float, None, "share of squared singular values kept, 0.01-1 (or rank=)", minimum=0.01, maximum=1),
    "layers": Param(str, "", "comma-separated fnmatch patterns of node or weight names (default: all)"),
    "min_size": Param(int, 4096, "leave weights with fewer elements alone", minimum=0),
    **FINE_TUNING_PARAMS,
}
DISTILL_PARAMS = {
    "student": Param(str, None, "package.module:function returning the student nn.Module (or layers=)"),
    "layers": Param(int, None, "transformers teacher: a student of this many of its layers (or student=)",
                    minimum=1),
    "epochs": Param(int, 3, "passes over --train-data", minimum=1),
    "temperature": Param(float, 2.0, "softening of teacher and student logits", minimum=0.05, maximum=100),
    "alpha": Param(float, 0.5, "weight of the teacher loss; the rest: cross-entropy on labels y, when "
                   "the train data has them", minimum=0, maximum=1),
    "batch_size": Param(int, 32, "training batch size", minimum=1),
    "learning_rate": Param(float, None, "AdamW learning rate (default 1e-3 with student=, 1e-4 with layers=)",
                           minimum=1e-8, maximum=1),
}
PRUNE_PARAMS = {
    "sparsity": Param(float, None, "share of weights set to zero (channel: of outputs, head: of heads removed)",
                      minimum=0, maximum=0.99, required=True),
    "structure": Param(Structure, "unstructured", "unstructured: single weights; channel: whole outputs; "
                       "head: attention heads", choices=STRUCTURES),
    **FINE_TUNING_PARAMS,
}
#: The same on the torch backend: one vocabulary.
DISTILL = Technique(
    "distill",
    help="train a smaller student (a factory's, or a transformers teacher's layers) to match the teacher on "
         "--train-data",
    params=DISTILL_PARAMS,
    requires_data={EVERY_STEP: "train"},
)
def lowrank_technique(what: str) -> Technique:
    """``lowrank`` as the onnx and torch backends declare it; ``what`` says what it factorizes."""
    return Technique("lowrank", help=f"{what}; fine-tuned on --train-data", params=LOWRANK_PARAMS,
                     candidates=("lowrank energy=0.99", "lowrank energy=0.95", "lowrank energy=0.9"))


QAT_PARAMS = {
    "epochs": Param(int, 2, "training epochs with fake-quantized weights and activations", minimum=1),
    "batch_size": Param(int, 32, "training batch size", minimum=1),
    "learning_rate": Param(float, 1e-4, "AdamW learning rate", minimum=1e-8, maximum=1),
}


def text_options() -> dict[str, Param]:
    """``--set max_length=`` and ``--set tokenizer=`` of text data (``text_data.py``)."""
    from compressor_onnx.text_data import TEXT_OPTIONS_HELP

    return {"max_length": Param(int, None, TEXT_OPTIONS_HELP["max_length"], minimum=1),
            "tokenizer": Param(str, None, TEXT_OPTIONS_HELP["tokenizer"])}


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
        "algorithm": Param(str, "rtn", "int4: rtn, hqq, or gptq (needs --calibration-data)",
                           choices=("rtn", "hqq", "gptq")),
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
        },
        options={
            "model_factory": Param(str, None, "package.module:function building the nn.Module for a state_dict"),
            "input_shape": Param(str, None, "example input shapes, e.g. 1,64 or input_ids:1,128:int64;attention_mask:1,128:int64"),
            "opset": Param(int, 17, "ONNX opset of exported graphs", minimum=13, maximum=21),
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
    if network.is_torch and network.export is None:
        # Forks share this cache: the torch model is exported once, then dropped.
        network.export = ExportCache(network.module, network.exported_program, holders=[network])
    return Model(NAME, path, _format(network), network, inputs, source_bytes=network.source_bytes)


@hookimpl
def compressor_load_data(path: Path, purpose: str, inputs: tuple[TensorSpec, ...], limit: int | None,
                         model_path: Path | None, context: Context | None) -> Dataset | None:
    """Text (``.txt``, ``.jsonl``) tokenized with the model's tokenizer; core reads ``.npz``."""
    from compressor_onnx.text_data import text_dataset

    return text_dataset(path, purpose, inputs, limit, model_path, context)


@hookimpl
def compressor_fork(model: Model, context: Context) -> Model:
    """Steps never modify a Network, so a fork shares the loaded graph, file and export."""
    network: Network = model.handle
    if network.export is not None:
        network = dataclasses.replace(network, module=None, exported_program=None)
    else:
        network = dataclasses.replace(network)
    return Model(NAME, model.source, model.format, network, model.inputs, list(model.notes), dict(model.metadata))


def _format(network: Network) -> str:
    """What the handle holds right now: a torch model awaiting export, or an ONNX graph."""
    return "torch" if network.is_torch else "onnx"


@hookimpl
def compressor_check_steps(model: Model, steps: list[Step], context: Context) -> None:
    """What the declaration cannot say, refused before anything is exported (:mod:`compressor_onnx.step_checks`)."""
    from compressor_onnx.step_checks import check_steps

    check_steps(model, steps, context)


@hookimpl
def compressor_compress(model: Model, step: Step, context: Context) -> Model | None:
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
    from compressor_onnx.finetune import fine_tuning_wanted, finetune_graph_edit, one_shot_note

    def edit(network: Network) -> tuple[Network, list[str], dict[str, Any], Any]:
        if step.technique == "lowrank" or step.params.get("structure") == "channel":
            from compressor_onnx.rewrite import apply_step

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
    """``distill``, ``qat`` and ``prune structure=head``: on the torch model, before export."""
    if step.technique == "distill":
        from compressor_onnx.distill import distill

        network, notes, metadata = distill(model, step, context)
    elif step.technique == "qat":
        from compressor_onnx.qat import qat

        network, notes, metadata = qat(model, step, context)
    else:
        network, notes, metadata = _prune_heads(model, step, context)
    return Model(NAME, model.source, _format(network), network, model.inputs,
                 [*model.notes, *notes], {**model.metadata, **metadata})


def _prune_heads(model: Model, step: Step, context: Context) -> tuple[Network, list[str], dict]:
    from compressor_onnx.finetune import fine_tuning_wanted, one_shot_note, train_student
    from compressor_onnx.heads import prune_heads, torch_model, with_module

    if not fine_tuning_wanted(step, context):
        network, notes, metadata = prune_heads(model, step, context)
        return network, [*notes, one_shot_note(step, context)], metadata
    # The unpruned model is the teacher: read it at most once; prune_heads edits a copy of a held module.
    _, teacher, _ = torch_model(model, step, context)
    held = Model(NAME, model.source, model.format, with_module(model.handle, teacher), model.inputs)
    network, notes, metadata = prune_heads(held, step, context)
    more_notes, more_metadata = train_student(network, teacher, network.module, step, context)
    return network, [*notes, *more_notes], {**metadata, **more_metadata}


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
    from compressor_onnx.export import exported
    from compressor_onnx.saving import save_network

    network = exported(model.handle, context)
    artifact, metadata = save_network(network, destination.with_suffix(".onnx"), context.progress)
    model.metadata.update({**_export_facts(network), **metadata})
    return artifact


@hookimpl
def compressor_open_runtime(artifact: Artifact, settings: MeasureSettings) -> Runtime:
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

