"""Hook implementations of the ``tflite`` backend: Keras and TensorFlow models to TFLite.

Keras models are loaded, pruned, restructured and trained by the Keras front end
(:mod:`compressor_frontends.keras`); this backend converts them to ``.tflite`` and
runs them in LiteRT. Importing this module imports no framework; TensorFlow,
tf-keras, tensorflow-model-optimization and LiteRT are imported inside the hooks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compressor.plugin import (
    EVERY_STEP,
    PRUNE,
    QUANTIZE,
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
    UnsupportedError,
    hookimpl,
)
from compressor_frontends.keras.distill import StudentFactory, Width
from compressor_frontends.pytorch.text_data import TEXT_OPTIONS_HELP
from compressor_tflite import frameworks, from_torch, loading
from compressor_tflite.handle import TFLiteHandle

NAME = "tflite"
LOWRANK = "lowrank"
QAT, DISTILL = "qat", "distill"
#: Load options of a PyTorch model (converted by litert-torch; see from_torch.py), as on the onnx backend.
TORCH_OPTIONS = {
    "model_factory": Param(str, None, "PyTorch state_dict: package.module:function building the nn.Module"),
    "input_shape": Param(str, None, "PyTorch: example input shapes, e.g. 1,64 (without a data file)"),
    "max_length": Param(int, None, TEXT_OPTIONS_HELP["max_length"], minimum=1),
    "tokenizer": Param(str, None, TEXT_OPTIONS_HELP["tokenizer"]),
}
STRUCTURES = ("unstructured", "channel")


class Structure(str):
    """The type of ``prune structure=``: coercing ``head`` refuses it as unsupported, so core
    stops the request while validating it, before any work."""

    def __new__(cls, value: object) -> str:  # type: ignore[misc]
        text = str(value).strip().lower()
        if text == "head":
            raise UnsupportedError("prune structure=head (attention heads of transformers models) is on "
                                   f"the onnx backend; here structure may be {' or '.join(STRUCTURES)}")
        return text


TECHNIQUES = {
    QUANTIZE: Technique(
        QUANTIZE,
        help="convert to TFLite with fp16 weights, int8 weights (dynamic), full integer (int8, uint8) "
             "or int16 activations with int8 weights (int16x8)",
        modes=("fp16", "dynamic", "int8", "uint8", "int16x8"),
        candidates=("quantize fp16", "quantize dynamic", "quantize int8"),
        params={
            "allow_float_fallback": Param(
                bool, False, "keep ops without integer kernels in float (int8/uint8/int16x8)"
            ),
            "calibration_samples": Param(
                int, 200, "calibration examples for the activation ranges of int8/uint8/int16x8", minimum=1
            ),
        },
        requires_data={"int8": "calibration", "uint8": "calibration", "int16x8": "calibration"},
    ),
    PRUNE: Technique(
        PRUNE,
        help="magnitude pruning (tensorflow-model-optimization), fine-tuned on --train-data",
        params={
            "sparsity": Param(
                float, None, "share of weights set to zero", minimum=0, maximum=0.99,
                required=True,
            ),
            "epochs": Param(int, 2, "fine-tuning epochs (0: one-shot)", minimum=0),
            "batch_size": Param(int, 32, "fine-tuning batch size", minimum=1),
            "learning_rate": Param(float, 1e-3, "fine-tuning Adam learning rate", minimum=0),
            "begin_step": Param(int, 0, "training step where pruning starts", minimum=0),
            "frequency": Param(int, 10, "training steps between mask updates", minimum=1),
            "structure": Param(Structure, "unstructured", "unstructured: single weights; channel: whole "
                               "Dense units and Conv2D filters", choices=STRUCTURES),
        },
        candidates=("prune 0.25 structure=channel", "prune 0.5 structure=channel", "prune 0.75 structure=channel"),
    ),
    LOWRANK: Technique(
        LOWRANK,
        help="Dense layers as two thin Dense layers from a truncated SVD, fine-tuned on --train-data",
        params={
            "rank": Param(int, None, "rank kept in every factorized layer (or energy=)", minimum=1),
            "energy": Param(float, None, "share of squared singular values kept, 0.01-1 (or rank=)",
                            minimum=0.01, maximum=1),
            "layers": Param(str, "", "comma-separated fnmatch patterns of layer names (default: all)"),
            "min_size": Param(int, 4096, "leave kernels with fewer weights alone", minimum=0),
            "epochs": Param(int, 2, "fine-tuning epochs (0: none)", minimum=0),
            "batch_size": Param(int, 32, "fine-tuning batch size", minimum=1),
            "learning_rate": Param(float, 1e-3, "fine-tuning Adam learning rate", minimum=0),
        },
        candidates=("lowrank energy=0.99", "lowrank energy=0.95", "lowrank energy=0.9"),
    ),
    QAT: Technique(
        QAT,
        help="quantization-aware training on --train-data (tensorflow-model-optimization), then full-integer "
             "int8; keeps the zeros of a pruned model",
        params={
            "epochs": Param(int, 2, "training epochs with fake-quantized weights and activations", minimum=1),
            "batch_size": Param(int, 32, "training batch size", minimum=1),
            "learning_rate": Param(float, 1e-4, "Adam learning rate", minimum=0),
        },
        requires_data={EVERY_STEP: "train"},
    ),
    DISTILL: Technique(
        DISTILL,
        help="train a smaller student (a factory's, or the teacher's layers narrowed by width=) to match the "
             "model on --train-data; the student replaces the model",
        params={
            "student": Param(StudentFactory, None, "package.module:function returning an uncompiled tf-keras "
                             "model with the teacher's inputs and outputs (or width=)"),
            "width": Param(Width, None, "derived student: this share (0-1) of every inner layer's units and "
                           "filters, fresh weights (default 0.5 without student=)"),
            "epochs": Param(int, 10, "training epochs", minimum=1),
            "batch_size": Param(int, 32, "training batch size", minimum=1),
            "learning_rate": Param(float, 1e-3, "Adam learning rate", minimum=0),
            "temperature": Param(float, 2.0, "softening of teacher and student logits", minimum=0.05, maximum=100),
            "alpha": Param(float, 0.5, "weight of the teacher-matching loss; the rest is cross-entropy on the "
                           "labels y where the data has them (0: the student trained on labels alone)",
                           minimum=0, maximum=1),
        },
        requires_data={EVERY_STEP: "train"},
    ),
}


@hookimpl
def compressor_backends() -> Iterator[Backend]:
    yield Backend(
        name=NAME,
        description="Keras (.keras, .h5) and TensorFlow SavedModel to TensorFlow Lite",
        formats=(".keras", ".h5", ".hdf5", "SavedModel folder", ".tflite",
                 "PyTorch (.pt, .pt2, .safetensors, transformers folder) with --backend tflite"),
        options=TORCH_OPTIONS,
        techniques=TECHNIQUES,
        extra="tflite",
        requires=("tensorflow", "tf_keras", "tensorflow_model_optimization"),
        distributions=("tensorflow-cpu", "tf-keras", "tensorflow-model-optimization", "ai-edge-litert"),
        runtime_imports=(frameworks.interpreter_module(),),
        default_variants=(("quantize fp16",), ("quantize dynamic",)),
    )


def with_defaults(step: Step) -> dict[str, Any]:
    """The step's parameters plus the declared defaults of those it leaves out."""
    declared = TECHNIQUES[step.technique].params
    return {**{key: param.default for key, param in declared.items()}, **step.params}


def training_params(step: Step, context: Context) -> dict[str, Any]:
    """:func:`with_defaults`, plus the run's options under ``options``: training reads
    ``label_output`` and ``task.NAME`` there (the output the labels train)."""
    return {**with_defaults(step), "options": dict(context.options)}


@hookimpl
def compressor_identify(path: Path) -> str | None:
    return NAME if loading.model_format(path) is not None else None


@hookimpl
def compressor_load(path: Path, backend: str, context: Context) -> Model:
    if from_torch.reads(path):
        torch_handle, fmt, inputs = from_torch.load(path, context.options, context.trust)
        return Model(NAME, path, fmt, torch_handle, inputs)
    with frameworks.private_tempdir():
        handle, fmt, inputs = loading.load(path, context.trust)
    return Model(NAME, path, fmt, handle, inputs)


@hookimpl
def compressor_load_data(path: Path, purpose: str, inputs: tuple[TensorSpec, ...], limit: int | None,
                         model_path: Path | None, context: Context | None) -> Dataset | None:
    """Text (``.txt``, ``.jsonl``) for a model with a tokenizer (a PyTorch or transformers
    model, tokenized as on the onnx backend); core reads ``.npz``."""
    from compressor_frontends.pytorch.text_data import text_dataset

    return text_dataset(path, purpose, inputs, limit, model_path, context)


@hookimpl
def compressor_fork(model: Model, context: Context) -> Model | None:
    # A PyTorch source shares its conversion; Keras models are loaded again.
    return from_torch.fork(model) if from_torch.is_torch_source(model.handle) else None


@hookimpl
def compressor_check_steps(model: Model, steps: list[Step], context: Context) -> None:
    """A PyTorch model takes quantize steps only here: refused before anything is converted."""
    if from_torch.is_torch_source(model.handle):
        for step in steps:
            from_torch.check_step(step)


@hookimpl
def compressor_compress(model: Model, step: Step, context: Context) -> Model | None:
    if from_torch.is_torch_source(model.handle):
        with frameworks.private_tempdir():
            return from_torch.quantize(model, step, with_defaults(step), context)
    with frameworks.private_tempdir():
        return _compress(model, step, context)


def _compress(model: Model, step: Step, context: Context) -> Model | None:
    handle: TFLiteHandle = model.handle
    if handle.converted:
        raise CompressionError(
            f"'{step}' cannot follow quantization or apply to a .tflite: "
            "prune first, quantize last, and start from the Keras model"
        )
    if step.technique == QUANTIZE:
        return _quantize(model, step, context)
    if step.technique in (QAT, DISTILL):
        return _train(model, step, context)
    if step.technique == LOWRANK or (step.technique == PRUNE and step.params.get("structure") == "channel"):
        return _restructure(model, step, context)
    if step.technique == PRUNE:
        return _prune(model, step, context)
    return None


def _restructure(model: Model, step: Step, context: Context) -> Model:
    from compressor_frontends.keras.channels import prune_channels
    from compressor_frontends.keras.structure import lowrank

    if model.handle.keras_model is None:
        raise CompressionError(f"{step.technique} needs a Keras model; a plain TensorFlow SavedModel can only "
                               "be quantized")
    change = lowrank if step.technique == LOWRANK else prune_channels
    result = change(model.handle.keras_model, training_params(step, context), model.inputs, context.train_data,
                    context.seed, context.progress)
    metadata = {**model.metadata, **result.metadata}
    handle = TFLiteHandle(keras_model=result.model)
    return Model(NAME, model.source, model.format, handle, model.inputs, [*model.notes, result.note], metadata)


def _train(model: Model, step: Step, context: Context) -> Model:
    """``qat`` and ``distill``: both train on --train-data (core made sure it was given)."""
    from compressor_frontends.keras.distill import distill
    from compressor_tflite.qat import qat

    keras_model, train = model.handle.keras_model, context.train_data
    if keras_model is None:
        raise CompressionError(f"{step.technique} needs a Keras model; a plain TensorFlow SavedModel can only "
                               "be quantized")
    if train is None:
        raise CompressionError(f"{step.technique} needs --train-data")
    params = training_params(step, context)
    if step.technique == DISTILL:
        result = distill(keras_model, params, model.inputs, train, context.seed, context.progress)
        return Model(NAME, model.source, model.format, TFLiteHandle(keras_model=result.model), model.inputs,
                     [*model.notes, result.note], {**model.metadata, **result.metadata})
    done = qat(keras_model, params, model.inputs, train, context.calibration_data or train, context.seed,
               context.progress)
    metadata = {**model.metadata, **done.metadata, "quantization": "int8"}
    return Model(NAME, model.source, "tflite", TFLiteHandle(flatbuffer=done.conversion.flatbuffer), model.inputs,
                 [*model.notes, done.note], metadata)


def _quantize(model: Model, step: Step, context: Context) -> Model:
    from compressor_tflite.convert import convert

    params = with_defaults(step)
    conversion = convert(
        model.handle,
        step.mode,
        model.inputs,
        context.calibration_data,
        calibration_samples=params["calibration_samples"],
        allow_float_fallback=params["allow_float_fallback"],
    )
    notes, metadata = list(model.notes), {**model.metadata, "quantization": step.mode}
    if conversion.float_ops:
        metadata["float_ops"] = conversion.float_ops
        notes.append(f"left in float (allow_float_fallback): {'; '.join(conversion.float_ops)}")
    handle = TFLiteHandle(flatbuffer=conversion.flatbuffer)
    return Model(NAME, model.source, "tflite", handle, model.inputs, notes, metadata)


def _prune(model: Model, step: Step, context: Context) -> Model:
    from compressor_frontends.keras.pruning import prune

    if model.handle.keras_model is None:
        raise CompressionError("prune needs a Keras model; a plain TensorFlow SavedModel can only be quantized")
    result = prune(
        model.handle.keras_model, training_params(step, context), model.inputs, context.train_data, context.seed,
        context.progress,
    )
    metadata = {**model.metadata, "sparsity": round(result.sparsity, 4)}
    handle = TFLiteHandle(keras_model=result.model)
    return Model(NAME, model.source, model.format, handle, model.inputs, [*model.notes, result.note], metadata)


@hookimpl
def compressor_save(model: Model, destination: Path, context: Context) -> Artifact:
    from compressor_tflite.convert import convert

    handle: TFLiteHandle = model.handle
    facts: dict[str, object] = {}
    if handle.converted:
        flatbuffer = handle.flatbuffer
    elif from_torch.is_torch_source(handle):
        with frameworks.private_tempdir():
            flatbuffer = from_torch.float_flatbuffer(handle, context)
        facts = dict(handle.conversion.metadata)
    else:
        with frameworks.private_tempdir():
            flatbuffer = convert(handle, None).flatbuffer
    path = destination.with_suffix(".tflite")
    path.write_bytes(flatbuffer)
    return Artifact(NAME, path, "tflite", metadata=facts)


@hookimpl
def compressor_open_runtime(artifact: Artifact, settings: MeasureSettings) -> Runtime:
    from compressor_tflite.runtime import open_runtime

    return open_runtime(artifact.path, settings.threads)


@hookimpl
def compressor_sample_models(directory: Path) -> Iterator[SampleModel]:
    from compressor_tflite.samples import digits_sample

    yield digits_sample(directory)
