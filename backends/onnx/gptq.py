"""``quantize int4 algorithm=gptq``: calibration activations once, then GPTQ per weight.

Each ``MatMul`` that becomes ``MatMulNBits`` needs the Hessian ``2 X^T X / n`` of its
input ``X``. One ONNX Runtime session on the float model, with every such input added
as an output, runs over the calibration examples once (fed as measuring feeds them,
state carried); each batch's activations go straight into one float64 accumulator per
input, shared by the weights reading it (Q, K and V read one). Should the accumulators
not fit in :data:`HESSIAN_BYTES`, the inputs are split into as many passes as needed.
gptq_solver.py then quantizes each weight (its Cholesky factor computed once per
input), and the codes are packed as ONNX Runtime's own quantizer packs them.

``algorithm=awq`` enters here too (the streaming path calls :func:`quantize_gptq`) and goes
to awq.py, which collects its statistics with the same pass (:func:`_hessians`).

This replaces ONNX Runtime 1.32's ``gptq_quantize``, which ran the whole model once
per distinct input, spread no rounding error (its ``Hinv[i:, i]`` is a column of the
upper factor, zero below the diagonal), re-rounded GPTQ's output on a second grid, and
could not pack asymmetric zero points of weights with an odd number of blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.plugin import CompressionError, CompressorError, Context, first_line

#: The float64 Hessians held at once; past this the calibration data is run again.
HESSIAN_BYTES = 1 << 30
#: Up to this input width numpy's BLAS runs GPTQ on one thread: its calls (a batch's
#: ``X^T X``, a factorization) then take milliseconds, and OpenBLAS's threads spend more
#: of them waiting for each other than computing (all-MiniLM-L6-v2 on two cores shared
#: with other work: 24 s of CPU with two BLAS threads, 13 s with one).
ONE_THREAD_WIDTH = 4096

Reader = Callable[[str], Any]
#: ``{weight name: {tensor suffix ("B", "scales", "zero_points"): array}}``.
Quantized = dict[str, dict[str, Any]]


def nbits_weight(node: Any, initializers: dict[str, Any], settings: Any) -> Any | None:
    """The 2-D float32 weight initializer ``node`` (a plain ``MatMul``) reads, when the
    streaming and GPTQ paths turn it into ``MatMulNBits``; ``None`` otherwise."""
    from onnx import TensorProto

    weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
    if (weight is None or node.domain not in ("", "ai.onnx") or node.name in settings.excluded_nodes
            or weight.data_type != TensorProto.FLOAT or len(weight.dims) != 2):
        return None
    return weight


def quantize_gptq(graph: Any, source: Any, read: Reader, settings: Any, context: Context,
                  samples: int) -> tuple[Quantized, list[str]]:
    """MatMulNBits tensors of every weight ``graph``'s MatMuls would quantize, and notes.

    ``graph`` is the float model (a ModelProto; a skeleton when ``source`` is a path),
    ``source`` what ONNX Runtime runs: the same ModelProto, or the path of its ``.onnx``
    (external data beside it). ``read`` gives a weight's float array by name.
    """
    assert context.calibration_data is not None, "check_int4 refuses gptq and awq without calibration data"
    inputs = layer_inputs(graph, source, settings, context, samples)
    if settings.algorithm == "awq":  # the same calibration, another use of it (awq.py)
        from compressor_onnx.awq import quantize_awq

        return quantize_awq(graph, read, settings, inputs)
    with inputs.blas_threads():
        quantized, notes = _quantize(graph, source, read, settings, context, samples, inputs.readers, inputs.widths)
    return quantized, notes


@dataclass
class LayerInputs:
    """The layer inputs of the MatMuls that become MatMulNBits, and the calibration pass
    that collects statistics of them (GPTQ's Hessians, AWQ's too)."""

    graph: Any
    source: Any
    context: Context
    samples: int
    #: weight -> the inputs it multiplies.
    readers: dict[str, set[str]]
    #: input -> its width (the weight's rows).
    widths: dict[str, int]

    def passes(self) -> list[set[str]]:
        return _passes(self.readers, self.widths)

    def collect(self, inputs: set[str], statistics: Callable[[int], Any], label: str) -> tuple[dict[str, Any], int]:
        """One calibration pass: ``statistics(width)`` of each of ``inputs`` filled, and the number of examples."""
        return _hessians(self.graph, self.source, {name: self.widths[name] for name in inputs}, self.context,
                         self.samples, statistics, label)

    def blas_threads(self) -> contextlib.AbstractContextManager[None]:
        return _blas_threads(1 if max(self.widths.values(), default=0) <= ONE_THREAD_WIDTH else None)


def layer_inputs(graph: Any, source: Any, settings: Any, context: Context, samples: int) -> LayerInputs:
    """``graph``'s quantized MatMuls' inputs (arguments as :func:`quantize_gptq`'s)."""
    initializers = {tensor.name: tensor for tensor in graph.graph.initializer}
    readers: dict[str, set[str]] = {}
    widths: dict[str, int] = {}
    for node in graph.graph.node:
        weight = nbits_weight(node, initializers, settings)
        if weight is not None:
            readers.setdefault(weight.name, set()).add(node.input[0])
            widths[node.input[0]] = weight.dims[0]
    return LayerInputs(graph, source, context, samples, readers, widths)


def _quantize(graph: Any, source: Any, read: Reader, settings: Any, context: Context, samples: int,
              readers: dict[str, set[str]], widths: dict[str, int]) -> tuple[Quantized, list[str]]:
    from compressor_onnx.gptq_solver import SolverError, factor, gptq, matmul_nbits_tensors

    quantized: Quantized = {}
    passes = _passes(readers, widths)
    examples = rows = 0
    for inputs in passes:
        hessians, examples = _hessians(graph, source, {name: widths[name] for name in inputs}, context, samples)
        rows = max([rows, *(hessian.rows for hessian in hessians.values())])
        factors: dict[tuple[str, ...], Any] = {}
        for weight, names in readers.items():
            if not names <= inputs:
                continue
            key = tuple(sorted(names))
            try:
                if key not in factors:
                    merged = hessians[key[0]]
                    for name in key[1:]:
                        merged = merged.merged(hessians[name])
                    factors[key] = factor(merged.matrix())
                result = gptq(read(weight), factors[key], settings.block_size, settings.symmetric)
            except SolverError as error:
                raise CompressionError(f"int4 gptq failed on {weight} ({error})") from None
            quantized[weight] = matmul_nbits_tensors(result)
        del hessians, factors  # before the next pass's
    plural = "es" if len(passes) != 1 else ""
    note = (f"gptq: {len(quantized)} MatMul weight(s) calibrated on {rows} activation rows "
            f"({examples} examples, {len(passes)} pass{plural} over them)")
    return quantized, [note] if quantized else []


@contextlib.contextmanager
def _blas_threads(count: int | None) -> Iterator[None]:
    """numpy's BLAS limited to ``count`` threads (``None``: as it is) where threadpoolctl
    (scikit-learn's dependency) is installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        count = None
    if count is None:
        yield
        return
    with threadpool_limits(limits=count, user_api="blas"):
        yield


def _passes(readers: dict[str, set[str]], widths: dict[str, int]) -> list[set[str]]:
    """Inputs grouped into calibration passes whose Hessians fit :data:`HESSIAN_BYTES`;
    the inputs of a weight read by several are always in one pass."""
    clusters: list[set[str]] = []
    for names in readers.values():
        touching = [cluster for cluster in clusters if cluster & names]
        merged = set(names).union(*touching)
        clusters = [cluster for cluster in clusters if not cluster & names] + [merged]
    passes: list[set[str]] = []
    held = 0
    for cluster in clusters:
        size = sum(8 * widths[name] ** 2 for name in cluster)
        if not passes or held + size > HESSIAN_BYTES:
            passes.append(set())
            held = 0
        passes[-1] |= cluster
        held += size
    return passes


def _hessians(graph: Any, source: Any, widths: dict[str, int], context: Context, samples: int,
              statistics: Callable[[int], Any] | None = None, label: str = "gptq") -> tuple[dict[str, Any], int]:
    """One pass over the calibration examples: the Hessian of each input in ``widths`` (or
    what ``statistics(width)`` accumulates: a Hessian's ``add``), and the number of examples."""
    from compressor_onnx.gptq_solver import Hessian
    from compressor_onnx.static_calibration import calibration_feeds

    assert context.calibration_data is not None
    feeds = calibration_feeds(graph, context.calibration_data, samples, context.options)
    graph_inputs = {value.name for value in graph.graph.input}
    outputs = [value.name for value in graph.graph.output]
    wanted = [name for name in widths if name not in graph_inputs and name not in outputs]
    session = _session(graph, source, wanted, label)
    names = outputs + wanted
    hessians = {name: (statistics or Hessian)(width) for name, width in widths.items()}

    def call(inputs: dict[str, Any]) -> dict[str, Any]:
        return dict(zip(names, session.run(names, inputs)))

    try:
        for fed, produced in feeds.run(0, feeds.count, call):
            for name, hessian in hessians.items():
                activations = fed[name] if name in graph_inputs else produced[name]
                if activations.shape and activations.shape[-1] == hessian.width:
                    hessian.add(activations)
    except CompressorError:
        raise
    except Exception as error:  # noqa: BLE001 - ONNX Runtime raises its own types on bad feeds
        raise CompressionError(f"int4 {label} calibration failed ({first_line(error)})") from None
    return hessians, feeds.count


def _session(graph: Any, source: Any, extra_outputs: list[str], label: str = "gptq") -> Any:
    """An ONNX Runtime session on ``source`` with ``extra_outputs`` added to its outputs."""
    import onnxruntime as ort
    from onnx import helper

    added = [helper.make_empty_tensor_value_info(name) for name in extra_outputs]
    options = ort.SessionOptions()
    # numpy's BLAS takes each batch's activations while the session waits: idle threads that
    # spin for work would take the cores it needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        if isinstance(source, (str, Path)):
            from compressor_onnx.external import load_skeleton

            skeleton = load_skeleton(Path(source))
            skeleton.graph.output.extend(added)
            # Beside the original, so its external data resolves; removed once loaded.
            augmented = Path(source).with_name(Path(source).stem + "-gptq-outputs.onnx")
            import onnx

            onnx.save_model(skeleton, str(augmented))
            try:
                return ort.InferenceSession(str(augmented), options, providers=["CPUExecutionProvider"])
            finally:
                augmented.unlink()
        graph.graph.output.extend(added)
        try:
            return ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
        finally:
            del graph.graph.output[len(graph.graph.output) - len(added):]
    except Exception as error:  # noqa: BLE001 - ONNX Runtime raises its own types on odd graphs
        raise CompressionError(f"int4 {label} could not run the model for calibration ({first_line(error)})") from None
