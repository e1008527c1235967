"""``qat``: quantization-aware training (the Keras front end's, with
tensorflow-model-optimization), then a full-integer (int8) TFLite conversion that
takes the ranges the training learned."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from compressor.plugin import Dataset, ProgressCallback, TensorSpec
from compressor_tflite.convert import Conversion, convert
from compressor_tflite.handle import TFLiteHandle

#: Representative examples for the conversion (QAT learned the activation ranges already).
REPRESENTATIVE = 200


@dataclass
class QatResult:
    conversion: Conversion
    note: str
    metadata: dict[str, Any] = field(default_factory=dict)


def qat(model: Any, params: Mapping[str, Any], inputs: Sequence[TensorSpec], train: Dataset,
        representative: Dataset, seed: int, progress: ProgressCallback) -> QatResult:
    from compressor_frontends.keras.qat import train_quantization_aware

    trained = train_quantization_aware(model, params, inputs, train, seed, progress)
    conversion = convert(TFLiteHandle(keras_model=trained.model), "int8", inputs, representative,
                         calibration_samples=REPRESENTATIVE)
    return QatResult(conversion, f"{trained.training}, then int8{trained.sparsity}", {"qat": trained.metadata})
