"""``quantize int4 algorithm=awq``: activation-aware scaling (awq_solver.py) on the graph.

The calibration pass is GPTQ's (gptq.py, which calls this module): one ONNX Runtime session
over the calibration examples, each layer input's ``X^T X`` and mean magnitude accumulated
once and shared by every weight reading it (Q, K and V read one). Per input, an ``alpha`` and scale ``s`` are
searched over all the weights reading it together; each weight is then stored as
``diag(s) W`` rounded (block ranges clipped where that helps) and the input is divided by
``s``: folded into the producer where that is exact (a normalization's gamma and beta, a ``Mul``
by a per-channel constant, as RMSNorm exports end, or the scales of the MatMulNBits making
one factor of a product, as Llama's up projection does for the down projection's input;
when nothing else reads the values in between), otherwise one ``Mul`` by ``1/s`` inserted
before the input's MatMulNBits.

An input is left unscaled (its weights rounded, clipped) when a weight reading it also
reads another input (tied weights), when no ``alpha`` beats plain rounding, or when its
MatMul writes a graph output: a language model's head, which AWQ's reference code leaves
alone too. There the layer's squared error is a poor guide: on a byte-level GPT-2 (4 x 256)
scaling the head's input lowered its calibration error by 7% and still cut top-1 agreement
with fp32 on held-out text from 0.961 to 0.937 (362 training steps; 0.963 to 0.960 after 1548).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from compressor.plugin import CompressionError

Reader = Callable[[str], Any]
#: ``{weight name: {tensor suffix ("B", "scales", "zero_points"): array}}``, as gptq.py's.
Quantized = dict[str, dict[str, Any]]

#: Normalizations whose output is ``normalized * gamma (+ beta)`` per last-axis channel:
#: the input indices of gamma and beta (Skip* take the skip input second).
NORMALIZATION_PARAMETERS = {
    "LayerNormalization": (1, 2),
    "SimplifiedLayerNormalization": (1,),
    "RMSNormalization": (1,),
    "SkipLayerNormalization": (2, 3),
    "SkipSimplifiedLayerNormalization": (2,),
}
#: Ops between a producer and the MatMuls that change no element's last-axis index (Cast: the
#: float32-to-float32 casts after a fused norm or attention, which type their output).
CHANNEL_PRESERVING = ("Reshape", "Identity", "Cast")


#: ``divide_columns(weight, s)``: divide the weight's output columns by ``s``; False if it cannot.
ColumnDivider = Callable[[str, Any], bool]


class Calibration(Protocol):
    """What AWQ needs of gptq.py's ``LayerInputs`` (passed in: gptq.py calls this module)."""

    graph: Any
    readers: dict[str, set[str]]

    def rounds(self, statistics: Callable[[int], Any], label: str
               ) -> Iterator[tuple[set[str], dict[str, Any], int]]: ...

    def describe(self, rounds: int) -> str: ...

    def blas_threads(self) -> contextlib.AbstractContextManager[None]: ...


@dataclass
class AwqResult:
    """What the search decided: the MatMulNBits tensors of every weight, the scale of each
    scaled input, and the search's figures."""

    quantized: Quantized = field(default_factory=dict)
    scales: dict[str, Any] = field(default_factory=dict)
    #: The weights multiplied by each scaled input's scale.
    scaled_weights: dict[str, list[str]] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    rows: int = 0
    examples: int = 0
    rounds: int = 0


def quantize_awq(graph: Any, read: Reader, settings: Any, inputs: Calibration) -> tuple[Quantized, list[str]]:
    """AWQ on every weight ``graph``'s MatMuls would quantize (``inputs``: gptq.py's
    ``LayerInputs`` of it; ``read`` gives a weight's float array by name): ``graph`` gets
    the input scales (folded or as Muls) in place; the weights' MatMulNBits tensors and
    notes are returned."""
    import numpy as np

    result = search_awq(read, settings, inputs)

    def divide_columns(weight: str, scale: Any) -> bool:
        tensors = result.quantized.get(weight)
        if tensors is None:  # not a weight that becomes MatMulNBits
            return False
        # MatMulNBits computes (code - zero) * scales[column, block]: exactly a column scale.
        tensors["scales"] = (tensors["scales"] / scale[:, None]).astype(np.float32)
        return True

    folded, inserted = apply_input_scales(graph, result.scales, result.scaled_weights, read, divide_columns)
    if not result.quantized:
        return {}, []
    alphas = sorted(result.alphas.values())
    spread = f", alpha {alphas[0]:.2f}-{alphas[-1]:.2f}" if alphas else ""
    note = (f"awq: {len(result.quantized)} MatMul weight(s) calibrated on {result.rows} activation rows "
            f"({result.examples} examples, {inputs.describe(result.rounds)}); "
            f"{len(result.scales)} input(s) scaled{spread} ({folded} folded into their producer, "
            f"{inserted} by an inserted Mul)")
    return result.quantized, [note]


def search_awq(read: Reader, settings: Any, inputs: Calibration) -> AwqResult:
    """The scales and quantized weights; the graph is left as it is."""
    with inputs.blas_threads():
        return _search(read, settings, inputs)


def _search(read: Reader, settings: Any, inputs: Calibration) -> AwqResult:
    from compressor_onnx.awq_solver import ActivationStatistics
    from compressor_onnx.gptq_solver import matmul_nbits_tensors

    readers = inputs.readers
    weights_of: dict[str, list[str]] = {}
    for weight, names in readers.items():
        for name in names:
            weights_of.setdefault(name, []).append(weight)
    # An input can be scaled only if each of its weights is multiplied by it alone; an output
    # head's is not (see the module's docstring).
    heads = _head_inputs(inputs.graph)
    scalable = {name for name, weights in weights_of.items()
                if name not in heads and all(readers[w] == {name} for w in weights)}
    result = AwqResult()
    for names_in_pass, statistics, result.examples in inputs.rounds(ActivationStatistics, "awq"):
        result.rounds += 1
        result.rows = max([result.rows, *(stat.rows for stat in statistics.values())])
        try:
            for name in sorted(names_in_pass & scalable):
                _scale_input(name, weights_of[name], statistics[name], read, settings, result)
            for weight, names in readers.items():
                if names <= names_in_pass and not names <= scalable:
                    merged = statistics[min(names)]
                    for other in sorted(names - {min(names)}):
                        merged = merged.merged(statistics[other])
                    result.quantized[weight] = matmul_nbits_tensors(
                        _clipped(read(weight), merged.matrix(), settings, weight))
        except FloatingPointError:
            raise CompressionError("int4 awq failed: the calibration activations are NaN or infinite") from None
        del statistics
    for weight in readers:
        result.quantized[weight] = result.quantized.pop(weight)  # the graph's order, as GPTQ returns them
    return result


def _head_inputs(graph: Any) -> set[str]:
    """The inputs of MatMuls that write a graph output (a language model's head)."""
    outputs = {value.name for value in graph.graph.output}
    return {node.input[0] for node in graph.graph.node if node.op_type == "MatMul" and node.output[0] in outputs}


def _scale_input(name: str, weights: list[str], statistics: Any, read: Reader, settings: Any,
                 result: AwqResult) -> None:
    """Search one input's scale, then quantize every weight reading it."""
    import numpy as np

    from compressor_onnx.awq_solver import search_scale
    from compressor_onnx.gptq_solver import matmul_nbits_tensors

    hessian = statistics.matrix()
    if not np.isfinite(hessian).all():
        raise FloatingPointError(name)
    arrays = {weight: read(weight) for weight in weights}
    choice = search_scale(list(arrays.values()), hessian, statistics.mean_magnitude(), settings.block_size,
                          settings.symmetric)
    if choice.alpha > 0:
        result.scales[name] = choice.scale
        result.alphas[name] = choice.alpha
        result.scaled_weights[name] = list(weights)
    for weight, array in arrays.items():
        scaled = array * choice.scale[:, None]
        result.quantized[weight] = matmul_nbits_tensors(_clipped(scaled, hessian, settings, weight))


def _clipped(weights: Any, hessian: Any, settings: Any, name: str) -> Any:
    """``weights`` quantized with each block's range clipped as AWQ's clip search decides."""
    import numpy as np

    from compressor_onnx.awq_solver import quantize_clipped

    if not np.isfinite(hessian).all():
        raise FloatingPointError(name)
    return quantize_clipped(weights, hessian, settings.block_size, settings.symmetric)


def apply_input_scales(model: Any, scales: dict[str, Any], scaled_weights: dict[str, list[str]],
                       read: Reader, divide_columns: ColumnDivider | None = None) -> tuple[int, int]:
    """Divide each input named in ``scales`` by its scale ``[K]`` for the MatMuls reading it
    with a weight of ``scaled_weights[input]`` (multiplied by it), in place: folded into its
    producer where exact, else by an inserted ``Mul``. ``divide_columns(weight, s)`` divides a
    MatMul weight's output columns (False if it cannot): the fold into ``a * (x @ W)``, as
    Llama's MLP computes the down projection's input. Returns how many were folded and how
    many Muls were inserted."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    readers = _readers(graph)
    producers = {output: node for node in graph.node for output in node.output if output}
    graph_outputs = {value.name for value in graph.output}
    folded = inserted = 0
    for name, scale in scales.items():
        weights = set(scaled_weights[name])
        matmuls = [node for node in readers.get(name, []) if node.op_type == "MatMul"
                   and node.input[0] == name and node.input[1] in weights]
        source = _channel_source(name, matmuls, readers, producers, graph_outputs)
        producer = producers.get(source) if source is not None else None
        parameters = _foldable(producer, source or "", scale.shape[0], initializers, producers)
        if producer is not None and parameters:
            # Divided copies: the originals may be shared (exporters merge equal tensors).
            for index, parameter in parameters.items():
                values = read(parameter)
                divided = (values / scale.reshape(values.shape)).astype(np.float32)
                copy = _unique(f"{parameter}_awq", initializers, producers)
                graph.initializer.append(numpy_helper.from_array(divided, copy))
                initializers[copy] = graph.initializer[-1]
                producer.input[index] = copy
            folded += 1
            continue
        if producer is not None and divide_columns is not None and any(
                divide_columns(weight, scale)
                for weight in _column_weights(producer, scale.shape[0], initializers, readers, producers, graph_outputs)):
            folded += 1
            continue
        inverse = _unique(f"{name}_awq_inverse_scale", initializers, producers)
        graph.initializer.append(numpy_helper.from_array((1 / scale).astype(np.float32), inverse))
        initializers[inverse] = graph.initializer[-1]
        scaled = _unique(f"{name}_awq_scaled", initializers, producers)
        first = min(list(graph.node).index(node) for node in matmuls)
        mul = helper.make_node("Mul", [name, inverse], [scaled], _unique(f"{name}_awq_Mul", initializers, producers))
        graph.node.insert(first, mul)
        producers[scaled] = mul
        for node in matmuls:
            node.input[0] = scaled
        inserted += 1
    return folded, inserted


def _channel_source(name: str, matmuls: list[Any], readers: dict[str, list[Any]], producers: dict[str, Any],
                    graph_outputs: set[str]) -> str | None:
    """The value whose scaling by ``1/s`` scales ``name`` and nothing else: ``name`` itself
    or what a chain of :data:`CHANNEL_PRESERVING` ops made it from (a Reshape keeping the
    last axis moves no element to another channel); ``None`` when anything but ``matmuls``
    and ``Shape`` (which reads no values) would see the change."""
    allowed = {id(node) for node in matmuls}
    while True:
        if name in graph_outputs or any(id(node) not in allowed and node.op_type != "Shape"
                                        for node in readers.get(name, [])):
            return None
        producer = producers.get(name)
        if producer is None or producer.op_type not in CHANNEL_PRESERVING or producer.domain not in ("", "ai.onnx"):
            return name
        # MatMul's input and a Reshape's output have the weight's width as their last axis; the
        # producer folded into has that many channels too (_foldable checks), so the axis is kept.
        name, allowed = producer.input[0], {id(producer)}


def _foldable(producer: Any, name: str, width: int, initializers: dict[str, Any],
              producers: dict[str, Any]) -> dict[int, str] | None:
    """The inputs of ``producer`` (by index) whose division by ``s`` divides its output
    ``name`` by ``s`` exactly, each with the initializer holding its values (an exporter may
    pass a shared one through Identity); ``None`` when the producer cannot take the scale."""
    if producer is None or producer.output[0] != name or producer.domain not in ("", "ai.onnx", "com.microsoft"):
        return None
    if producer.op_type in NORMALIZATION_PARAMETERS:
        indices = [index for index in NORMALIZATION_PARAMETERS[producer.op_type]
                   if index < len(producer.input) and producer.input[index]]
    elif producer.op_type == "Mul" and len(producer.input) == 2:
        indices = [index for index, value in enumerate(producer.input)
                   if _constant(value, initializers, producers) is not None]
        if len(indices) != 1:
            return None
    else:
        return None
    sources: dict[int, str] = {}
    for index in indices:
        source = _constant(producer.input[index], initializers, producers)
        tensor = initializers.get(source or "")
        dims = list(tensor.dims) if tensor is not None else []
        if (tensor is None or tensor.data_type != 1 or not dims or dims[-1] != width
                or any(d != 1 for d in dims[:-1])):
            return None
        sources[index] = tensor.name
    return sources or None


def _column_weights(producer: Any, width: int, initializers: dict[str, Any], readers: dict[str, list[Any]],
                    producers: dict[str, Any], graph_outputs: set[str]) -> list[str]:
    """For ``producer`` a product of two values: the weights of the MatMuls making either
    (through :data:`CHANNEL_PRESERVING` ops read by nothing else), whose output columns
    scale the product's channels one for one; the weight read by that MatMul alone."""
    if producer.op_type != "Mul" or producer.domain not in ("", "ai.onnx") or len(producer.input) != 2:
        return []
    found = []
    for value in producer.input:
        node = producers.get(value)
        allowed = {id(producer)}
        while True:
            if (node is None or value in graph_outputs
                    or any(id(reader) not in allowed and reader.op_type != "Shape" for reader in readers.get(value, []))):
                node = None
                break
            if node.op_type not in CHANNEL_PRESERVING or node.domain not in ("", "ai.onnx"):
                break
            allowed, value = {id(node)}, node.input[0]
            node = producers.get(value)
        weight = initializers.get(node.input[1]) if node is not None and node.op_type == "MatMul" else None
        if (weight is not None and node.domain in ("", "ai.onnx") and len(weight.dims) == 2
                and weight.dims[1] == width and len(readers.get(weight.name, [])) == 1):
            found.append(weight.name)
    return found


def _constant(value: str, initializers: dict[str, Any], producers: dict[str, Any]) -> str | None:
    """The initializer ``value`` is, directly or through Identity nodes; ``None`` if none."""
    while value not in initializers:
        producer = producers.get(value)
        if producer is None or producer.op_type != "Identity" or producer.domain not in ("", "ai.onnx"):
            return None
        value = producer.input[0]
    return value


def _readers(graph: Any) -> dict[str, list[Any]]:
    """The nodes reading each value, a node once per value; a subgraph's use of an outer
    value counts as its node's."""
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        names = set(node.input) | _subgraph_names(node)
        for value in names:
            if value:
                readers.setdefault(value, []).append(node)
    return readers


def _subgraph_names(node: Any) -> set[str]:
    from onnx import AttributeProto

    names: set[str] = set()
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == AttributeProto.GRAPH else list(attribute.graphs)
        for subgraph in graphs:
            for inner in subgraph.node:
                names |= set(inner.input) | _subgraph_names(inner)
    return names


def _unique(base: str, initializers: dict[str, Any], producers: dict[str, Any]) -> str:
    name, index = base, 0
    while name in initializers or name in producers:
        index += 1
        name = f"{base}_{index}"
    return name
