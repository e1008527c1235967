"""``quantize int4``'s parameters: their defaults and choices, and :class:`Int4Settings`,
what the in-memory (int4.py), streaming (int4_stream.py), GPTQ (gptq.py) and AWQ (awq.py) paths read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from compressor.plugin import Step
from compressor_onnx.quantize_common import parse_names

ALGORITHMS = ("rtn", "hqq", "gptq", "awq")
#: The algorithms that run the model on ``--calibration-data`` (gptq.py, awq.py).
CALIBRATED_ALGORITHMS = ("gptq", "awq")
#: MatMulNBits and GatherBlockQuantized take power-of-two blocks from 16.
BLOCK_SIZES = ("16", "32", "64", "128", "256")
#: Measured on all-MiniLM-L6-v2 (docs/backends/onnx.md): 32 keeps the most
#: fidelity and still makes linear weights 6.2x smaller (asymmetric).
DEFAULT_BLOCK_SIZE = "32"
#: The block size of a generation-ready language model (a graph with a key/value cache) whose
#: step leaves it unset: GPTQ's, AWQ's and NNCF's group size, and ONNX Runtime's quantizer's
#: default. Decoding streams every weight once per token, and blocks of 128 read 9% fewer bytes
#: than 32 and run MatMulNBits faster per byte (docs/backends/onnx.md, measured).
LANGUAGE_MODEL_BLOCK_SIZE = "128"
#: Int8 compute inside MatMulNBits: measured faster than float compute with the
#: same outputs to 4 decimals on all-MiniLM-L6-v2.
DEFAULT_ACCURACY_LEVEL = 4
BITS = 4


@dataclass(frozen=True)
class Int4Settings:
    block_size: int
    symmetric: bool
    algorithm: str
    accuracy_level: int
    excluded_nodes: frozenset[str]
    excluded_ops: frozenset[str]

    @classmethod
    def from_step(cls, step: Step) -> Int4Settings:
        return cls(
            block_size=int(step.params.get("block_size", DEFAULT_BLOCK_SIZE)),
            symmetric=bool(step.params.get("symmetric", False)),
            algorithm=str(step.params.get("algorithm", "rtn")),
            accuracy_level=int(step.params.get("accuracy_level", DEFAULT_ACCURACY_LEVEL)),
            excluded_nodes=frozenset(parse_names(step.params.get("exclude_nodes"))),
            excluded_ops=frozenset(parse_names(step.params.get("exclude_op_types"))),
        )


def mode_facts(step: Step) -> dict[str, Any]:
    """The int4 settings a variant's metadata records (nothing for other modes)."""
    if step.mode != "int4":
        return {}
    settings = Int4Settings.from_step(step)
    return {"int4": {"block_size": settings.block_size, "symmetric": settings.symmetric,
                     "algorithm": settings.algorithm, "accuracy_level": settings.accuracy_level}}


def for_model(step: Step, model: Any) -> Step:
    """``step`` as it applies to ``model`` (an ONNX ModelProto, its graph alone read): an int4
    step that leaves ``block_size`` unset gets :data:`LANGUAGE_MODEL_BLOCK_SIZE` on a
    generation-ready language model (the step's text is unchanged: the size stays defaulted),
    unless a MatMul weight has fewer input rows than that (a toy model: a block would be
    mostly padding)."""
    if step.mode != "int4" or "block_size" not in step.defaulted:
        return step
    from compressor_onnx.kv_runtime import graph_cache_layout

    if graph_cache_layout(model) is None or _fewest_input_rows(model) < int(LANGUAGE_MODEL_BLOCK_SIZE):
        return step
    return dataclasses.replace(step, params={**step.params, "block_size": LANGUAGE_MODEL_BLOCK_SIZE})


def _fewest_input_rows(model: Any) -> int:
    """The smallest first dimension of a 2-D initializer a MatMul multiplies by (its K)."""
    shapes = {tensor.name: tuple(tensor.dims) for tensor in model.graph.initializer}
    rows = [shapes[node.input[1]][0] for node in model.graph.node
            if node.op_type == "MatMul" and len(shapes.get(node.input[1], ())) == 2]
    return min(rows, default=0)
