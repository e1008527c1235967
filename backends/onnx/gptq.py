"""``quantize int4 algorithm=gptq``: calibration activations once, then GPTQ per weight.

Each ``MatMul`` that becomes ``MatMulNBits`` needs the Hessian ``2 X^T X / n`` of its
input ``X``. One ONNX Runtime session on the float model, with every such input added
as an output, runs over the calibration examples once (fed as measuring feeds them,
state carried); each batch's activations go straight into one float64 accumulator per
input, shared by the weights reading it (Q, K and V read one). Should the accumulators
not fit in :data:`HESSIAN_BYTES`, the inputs are split into as many passes as needed.
A model on disk (past the large-model threshold) runs once, piece by piece (segments.py):
each piece's weights are quantized as soon as it has run, so the process holds one piece's
weights and Hessians, never the model's or all of its Hessians (7.7 GB in float64 on a
1.1 B Llama, 1.7x its weights). gptq_solver.py quantizes each weight (its Cholesky factor
computed once per input), and the codes are packed as ONNX Runtime's own quantizer packs them.

``algorithm=awq`` enters here too (the streaming path calls :func:`quantize_gptq`) and goes
to awq.py, which collects its statistics in the same rounds (:meth:`LayerInputs.rounds`).

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

from compressor.plugin import STATE_PREFIX, CompressionError, CompressorError, Context, first_line

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
        quantized, notes = _quantize(inputs, read, settings)
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
    #: The pieces the last :meth:`rounds` ran the model in (0: whole, in passes).
    pieces: int = 0

    def rounds(self, statistics: Callable[[int], Any], label: str) -> Iterator[tuple[set[str], dict[str, Any], int]]:
        """The inputs' ``statistics(width)`` (a Hessian's ``add``) over the calibration examples,
        in rounds: each yields inputs whose weights' inputs are all done, their statistics, and
        the number of examples. A model in memory: as many passes over the examples as
        :data:`HESSIAN_BYTES` needs; a model on disk: one pass, piece by piece (segments.py),
        the statistics of each input held from the piece producing it until its weights are done."""
        stateful = any(key.startswith(STATE_PREFIX) for key in self.context.options)
        if not isinstance(self.source, (str, Path)) or stateful:
            self.pieces = 0
            for inputs in _passes(self.readers, self.widths):
                found, examples = _hessians(self.graph, self.source, {name: self.widths[name] for name in inputs},
                                            self.context, self.samples, statistics, label)
                yield inputs, found, examples
            return
        yield from _piece_rounds(self, statistics, label)

    def describe(self, rounds: int) -> str:
        """How :meth:`rounds` went over the examples, for a note."""
        if self.pieces:
            return f"one pass over them, the model in {self.pieces} piece{'s' if self.pieces != 1 else ''}"
        return f"{rounds} pass{'es' if rounds != 1 else ''} over them"

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


def _piece_rounds(layers: LayerInputs, statistics: Callable[[int], Any], label: str
                  ) -> Iterator[tuple[set[str], dict[str, Any], int]]:
    """:meth:`LayerInputs.rounds` of a model on disk: one pass, piece by piece."""
    from compressor_onnx.segments import PieceRunner, pieces_for
    from compressor_onnx.static_calibration import calibration_feeds

    assert layers.context.calibration_data is not None
    feeds = calibration_feeds(layers.graph, layers.context.calibration_data, layers.samples, layers.context.options)
    widths = layers.widths
    # A piece also holds the statistics of the inputs it produces (about a float64 Hessian each).
    pieces = pieces_for(layers.graph, list(widths), {name: 8 * width**2 for name, width in widths.items()})
    layers.pieces = len(pieces)
    clusters = _clusters(layers.readers)
    held: dict[str, Any] = {}
    finished: set[str] = set()
    batches = feeds.batches()
    with PieceRunner(layers.graph, Path(layers.source), pieces, lambda path: _piece_session(path, label)) as runner:
        for index, piece in enumerate(pieces):
            held.update((name, statistics(widths[name])) for name in piece.probes)
            try:
                for values in runner.run(index, batches):
                    for name, activations in values.items():
                        if activations.shape and activations.shape[-1] == widths[name]:
                            held[name].add(activations)
            except CompressorError:
                raise
            except Exception as error:  # noqa: BLE001 - ONNX Runtime raises its own types on bad feeds
                raise CompressionError(f"int4 {label} calibration failed ({first_line(error)})") from None
            finished.update(piece.probes)
            done = [cluster for cluster in clusters if cluster <= finished]
            clusters = [cluster for cluster in clusters if not cluster <= finished]
            if done:
                names = set().union(*done)
                yield names, {name: held.pop(name) for name in names}, feeds.count


def _quantize(layers: LayerInputs, read: Reader, settings: Any) -> tuple[Quantized, list[str]]:
    from compressor_onnx.gptq_solver import Hessian, SolverError, factor, gptq, matmul_nbits_tensors

    quantized: Quantized = {}
    examples = rows = rounds = 0
    for inputs, hessians, count in layers.rounds(Hessian, "gptq"):
        examples = count
        rounds += 1
        rows = max([rows, *(hessian.rows for hessian in hessians.values())])
        factors: dict[tuple[str, ...], Any] = {}
        for weight, names in layers.readers.items():
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
        del hessians, factors  # before the next round's
    note = (f"gptq: {len(quantized)} MatMul weight(s) calibrated on {rows} activation rows "
            f"({examples} examples, {layers.describe(rounds)})")
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
    passes: list[set[str]] = []
    held = 0
    for cluster in _clusters(readers):
        size = sum(8 * widths[name] ** 2 for name in cluster)
        if not passes or held + size > HESSIAN_BYTES:
            passes.append(set())
            held = 0
        passes[-1] |= cluster
        held += size
    return passes


def _clusters(readers: dict[str, set[str]]) -> list[set[str]]:
    """The inputs in groups that weights read together (most inputs alone)."""
    clusters: list[set[str]] = []
    for names in readers.values():
        touching = [cluster for cluster in clusters if cluster & names]
        merged = set(names).union(*touching)
        clusters = [cluster for cluster in clusters if not cluster & names] + [merged]
    return clusters


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


def _options() -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # numpy's BLAS takes each batch's activations while the session waits: idle threads that
    # spin for work would take the cores it needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _piece_session(path: Path, label: str) -> Any:
    """A session on one piece of the model (segments.py)."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), _options(), providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - ONNX Runtime raises its own types on odd graphs
        raise CompressionError(f"int4 {label} could not run the model for calibration ({first_line(error)})") from None


def _session(graph: Any, source: Any, extra_outputs: list[str], label: str = "gptq") -> Any:
    """An ONNX Runtime session on ``source`` with ``extra_outputs`` added to its outputs."""
    import onnxruntime as ort
    from onnx import helper

    added = [helper.make_empty_tensor_value_info(name) for name in extra_outputs]
    options = _options()
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
