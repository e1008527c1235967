"""What a loaded tflite-backend model holds between steps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class TFLiteHandle:
    """A Keras model (or SavedModel folder) not yet converted, or a converted flatbuffer.

    Quantization converts, so once ``flatbuffer`` is set no further step applies.
    """

    keras_model: Any | None = None
    saved_model_dir: Path | None = None
    flatbuffer: bytes | None = None

    @property
    def converted(self) -> bool:
        return self.flatbuffer is not None
