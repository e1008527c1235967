"""Quantization-aware training with tensorflow-model-optimization (the Keras side of ``qat``).

``quantize_model`` wraps every layer with fake-quantized weights and activations;
the model is fine-tuned so that its weights adapt to int8 rounding, and a converter
then takes the learned ranges (the LiteRT backend's full-integer conversion). A
model whose kernels are mostly zeros (after ``prune``) gets the prune-preserving
scheme of tfmot's collaborative optimization, so fine-tuning keeps its zeros
instead of filling them in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from compressor.plugin import CompressionError, Dataset, ProgressCallback, TensorSpec
from compressor_frontends.keras import frameworks

#: Above this share of zeros in its kernels a model is treated as pruned.
SPARSE = 0.2


@dataclass
class QatTrained:
    """A model trained with fake quantization, named like the float model, ready to convert."""

    model: Any
    #: What was trained, for the note: "quantization-aware training: 2 epoch(s) on train.npz against labels".
    training: str
    #: "" or "; sparsity kept by tfmot's prune-preserving scheme: ..." to end the note with.
    sparsity: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


def train_quantization_aware(model: Any, params: Mapping[str, Any], inputs: Sequence[TensorSpec],
                             train: Dataset, seed: int, progress: ProgressCallback) -> QatTrained:
    from compressor_frontends.keras.distill import match
    from compressor_frontends.keras.training import fit, labels_for

    keras = frameworks.keras()
    keras.utils.set_random_seed(seed)
    before = kernel_sparsity(model)
    preserve = before >= SPARSE
    quantized = _quantize_model(model, preserve)
    epochs = int(params["epochs"])
    message = "quantization-aware training"
    choice = labels_for(model, inputs, params, train)
    if choice.index is not None or len(model.outputs) > 1:
        # The labels train the output they belong to; every other output is matched to the float model's.
        fit(quantized, model, params, inputs, train, epochs, progress, message, choice=choice)
        how = ("labels" if len(model.outputs) == 1 else f"labels through {choice.name} ({choice.why}) and the "
               "float model's other outputs") if choice.index is not None else "the float model's outputs"
    else:
        match(quantized, model, params, inputs, train, epochs, 1.0, 1.0, progress, message)
        how = "the float model's outputs" + (" (no labels y)" if train.labels is None else "")
    if choice.index is None and choice.note:
        how += f" ({choice.note})"
    after = kernel_sparsity(quantized) if preserve else None
    training = f"quantization-aware training: {epochs} epoch(s) on {train.path.name} against {how}"
    metadata: dict[str, Any] = {"epochs": epochs, "labels": choice.index is not None, "label_output": choice.name}
    sparsity = ""
    if after is not None:
        sparsity = f"; sparsity kept by tfmot's prune-preserving scheme: {before:.1%} -> {after:.1%} zeros"
        metadata.update(sparsity_before=round(before, 4), sparsity_after=round(after, 4))
    return QatTrained(_named_like(keras, quantized, model), training, sparsity, metadata)


def _quantize_model(model: Any, preserve_sparsity: bool) -> Any:
    tfmot = frameworks.model_optimization()
    quantization = tfmot.quantization.keras
    try:
        with quantization.quantize_scope():
            if not preserve_sparsity:
                return quantization.quantize_model(model)
            scheme = tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
            return quantization.quantize_apply(quantization.quantize_annotate_model(model), scheme)
    except (ValueError, TypeError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CompressionError(f"tensorflow-model-optimization cannot quantize this model for QAT: "
                               f"{first[:300]}") from None


def _named_like(keras: Any, quantized: Any, model: Any) -> Any:
    """``quantized`` with ``model``'s output names (the signature's), not ``quant_<name>``."""
    if list(quantized.output_names) == list(model.output_names):
        return quantized
    outputs = [keras.layers.Identity(name=name)(tensor) for name, tensor in zip(model.output_names,
                                                                                quantized.outputs)]
    return keras.Model(quantized.inputs, outputs, name=model.name)


def kernel_sparsity(model: Any) -> float:
    """The share of exact zeros among the kernels (weights named ``kernel``) of ``model``."""
    import numpy as np

    kernels = [weight.numpy() for weight in model.weights
               if weight.name.rsplit("/", 1)[-1].split(":")[0] in ("kernel", "depthwise_kernel")]
    total = sum(kernel.size for kernel in kernels)
    return sum(int(np.sum(kernel == 0)) for kernel in kernels) / total if total else 0.0
