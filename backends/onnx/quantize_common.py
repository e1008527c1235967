"""What every ``quantize`` mode shares: ONNX Runtime's quantizers kept quiet, the op lists
and names a step's parameters give, the calibration method, the large-file test,
``reduce_range=auto`` and the fp16 conversion.

Below every quantize module (quantization.py dispatches; int8_file.py, int8_choice.py,
transformer_static.py, static_calibration.py, int4*.py and large.py use these), so that
none of them imports another's helpers.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from compressor.plugin import CompressionError, Step
from compressor_frontends.pytorch.export import large_model_bytes
from compressor_onnx.quantize_failures import shown_reason

#: The weighted ops: what static quantization covers on models past the large-model
#: threshold, and one of the configurations the generic path tries (int8_choice.py).
#: Quantizing every op ONNX Runtime can (LayerNormalization, Reshape, Where...) dropped
#: all-MiniLM-L6-v2's embedding cosine to ~0.3 (transformers take their own path).
STATIC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")


@contextlib.contextmanager
def quiet_ort() -> Iterator[None]:
    """The weight-only quantizers configure the root logger at import and print
    progress bars: keep both off the CLI's output."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)
        root.setLevel(level)
        root.handlers[:] = handlers


def resolve_reduce_range(step: Step) -> bool:
    """``reduce_range=auto``: 7-bit weights on x86 CPUs without VNNI or AMX, where ONNX
    Runtime's u8 x s8 kernels (``vpmaddubsw``) can saturate 16-bit sums; off elsewhere."""
    value = str(step.params.get("reduce_range", "auto")).lower()
    if value != "auto":
        return value == "true"
    import platform

    from compressor.plugin import cpu_info

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_info()["flags"])


def calibration_method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def op_types(candidates: Iterable[str], step: Step) -> list[str]:
    excluded = set(parse_names(step.params.get("exclude_op_types")))
    return [op for op in candidates if op not in excluded]


def parse_names(value: Any) -> list[str]:
    return [name.strip() for name in str(value or "").split(",") if name.strip()]


def is_large_file(path: Path) -> bool:
    """The model at ``path`` is past the large-model threshold or keeps its weights in a ``.data`` file."""
    return path.stat().st_size > large_model_bytes() or (path.parent / f"{path.name}.data").exists()


def to_fp16(graph: Any, infer_shapes: bool = True) -> Any:
    """Float16 weights and compute; the model's inputs and outputs stay float32.

    Converts ``graph`` in place; ``infer_shapes=False`` when its value types are
    already inferred (large models are inferred by path).
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        with quiet_ort():
            return convert_float_to_float16(graph, keep_io_types=True, disable_shape_infer=not infer_shapes)
    except Exception as error:  # noqa: BLE001 - the converter raises anything on odd graphs
        raise CompressionError(f"fp16 conversion failed ({shown_reason(error)})") from None
