"""``qat``: quantization-aware training with tensorflow-model-optimization, then a
full-integer (int8) TFLite conversion.

``quantize_model`` wraps every layer with fake-quantized weights and activations;
the model is fine-tuned so that its weights adapt to int8 rounding, and the
converter then takes the learned ranges. A model whose kernels are mostly zeros
(after ``prune``) gets the prune-preserving scheme of tfmot's collaborative
optimization, so fine-tuning keeps its zeros instead of filling them in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from compressor import CompressionError, Dataset, TensorSpec
from compressor.models import ProgressCallback
from compressor_tflite import frameworks
from compressor_tflite.convert import Conversion, convert
from compressor_tflite.handle import TFLiteHandle

#: Above this share of zeros in its kernels a model is treated as pruned.
SPARSE = 0.2
#: Representative examples for the conversion (QAT learned the activation ranges already).
REPRESENTATIVE = 200


@dataclass
class QatResult:
    conversion: Conversion
    note: str
    metadata: dict[str, Any] = field(default_factory=dict)


def qat(model: Any, params: Mapping[str, Any], inputs: Sequence[TensorSpec], train: Dataset,
        representative: Dataset, seed: int, progress: ProgressCallback) -> QatResult:
    from compressor_tflite.distill import match
    from compressor_tflite.pruning import fit, labels_for

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
    conversion = convert(TFLiteHandle(keras_model=_named_like(keras, quantized, model)), "int8", inputs,
                         representative, calibration_samples=REPRESENTATIVE)
    note = f"quantization-aware training: {epochs} epoch(s) on {train.path.name} against {how}, then int8"
    metadata: dict[str, Any] = {"epochs": epochs, "labels": choice.index is not None, "label_output": choice.name}
    if after is not None:
        note += f"; sparsity kept by tfmot's prune-preserving scheme: {before:.1%} -> {after:.1%} zeros"
        metadata.update(sparsity_before=round(before, 4), sparsity_after=round(after, 4))
    return QatResult(conversion, note, {"qat": metadata})


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
