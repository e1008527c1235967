"""A large model's calibration run piece by piece, so no process holds all of its weights.

Calibration (GPTQ's and AWQ's statistics, static int8's ranges, SmoothQuant's maxima) reads
activations of a model that, on the large-model path, may be several GB. One ONNX Runtime
session on the whole graph holds every weight (1.0x W) on top of the statistics. Here the
graph, cut to the nodes the wanted tensors need, is split in topological order into pieces
whose weights (and the statistics the caller keeps of the tensors each produces) fit a
budget. Each piece runs over every calibration batch in its own session, which is dropped
before the next piece's; the tensors a later piece reads (a transformer's hidden state,
its mask and rotary tables) are written to the scratch folder batch by batch and read back
there. The process then holds one piece's weights and one batch's tensors: on a 1.1 B
Llama, a layer's weights, not the model's. The activations come from the same kernels, so
the statistics equal the whole graph's, up to the fusions ONNX Runtime cannot make across a
cut (none where calibration turns graph optimizations off, as static int8's ranges do).

A stateful model (one batch's output fed to the next batch) runs whole: a piece cannot
wait for the last piece of the batch before.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.plugin import release_freed_memory

#: A piece's weights (and kept statistics) at least this many bytes, whatever the budget.
MIN_PIECE_BYTES = 64 << 20
#: The share of the model's weights one piece holds by default.
PIECES = 8

Session = Callable[[Path], Any]


@dataclass
class Piece:
    """Consecutive nodes of the graph and the tensors crossing its edges."""

    nodes: list[Any] = field(default_factory=list)
    #: Tensors it reads from the graph's inputs or from earlier pieces.
    reads: list[str] = field(default_factory=list)
    #: Tensors it produces that later pieces read (stored between pieces).
    keeps: list[str] = field(default_factory=list)
    #: Wanted tensors it produces (or, the first piece, wanted graph inputs).
    probes: list[str] = field(default_factory=list)


def pieces_for(model: Any, wanted: Sequence[str], extra: Mapping[str, int] | None = None) -> list[Piece]:
    """The pieces ``model`` (a skeleton) runs in to compute ``wanted``: one, up to the large-model
    threshold; past it, each with at most 1/:data:`PIECES` of the weights (``extra``: see
    :func:`plan_pieces`)."""
    from compressor_frontends.pytorch.export import large_model_bytes

    weights = sum(_sizes(model.graph).values())
    budget = max(MIN_PIECE_BYTES, weights // PIECES) if weights > large_model_bytes() else 1 << 62
    return plan_pieces(model.graph, wanted, budget, extra)


def _sizes(graph: Any) -> dict[str, int]:
    from compressor_onnx.external import external_reference, is_external, tensor_nbytes

    return {tensor.name: external_reference(tensor)[2] if is_external(tensor) else tensor_nbytes(tensor)
            for tensor in graph.initializer}


def node_reads(node: Any) -> list[str]:
    """The tensors ``node`` reads, those its subgraphs (If, Loop, Scan) take from outer scopes included."""
    from onnx import AttributeProto

    reads = [name for name in node.input if name]
    for attribute in node.attribute:
        if attribute.type == AttributeProto.GRAPH:
            reads += _outer_reads(attribute.g)
        elif attribute.type == AttributeProto.GRAPHS:
            for graph in attribute.graphs:
                reads += _outer_reads(graph)
    return list(dict.fromkeys(reads))


def _outer_reads(graph: Any) -> list[str]:
    local = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer}
    reads: list[str] = []
    for node in graph.node:
        reads += [name for name in node_reads(node) if name not in local]
        local.update(node.output)
    return reads


def plan_pieces(graph: Any, wanted: Sequence[str], budget: int, extra: Mapping[str, int] | None = None) -> list[Piece]:
    """``graph`` (a GraphProto, topologically ordered) cut to what ``wanted`` needs, in pieces
    whose new weights plus ``extra`` bytes of the tensors they produce stay within ``budget``
    (a single node past it is a piece of its own)."""
    extra = extra or {}
    sizes = _sizes(graph)
    graph_inputs = {value.name for value in graph.input} - set(sizes)
    produced = {name for node in graph.node for name in node.output if name}
    missing = [name for name in wanted if name not in produced and name not in graph_inputs]
    if missing:
        raise ValueError(f"the graph computes no tensor named {', '.join(missing)}")
    nodes = _needed(graph, set(wanted))
    groups: list[list[Any]] = []
    held, loaded = 0, set()
    for node in nodes:
        reads = node_reads(node)
        cost = sum(sizes[name] for name in reads if name in sizes and name not in loaded)
        cost += sum(extra.get(name, 0) for name in node.output)
        if not groups or (held and cost and held + cost > budget):  # a node without weights stays
            groups.append([])
            held, loaded = 0, set()
        groups[-1].append(node)
        held += cost
        loaded.update(name for name in reads if name in sizes)
    return _edges(groups, set(sizes), [name for name in wanted if name in graph_inputs], set(wanted))


def _needed(graph: Any, wanted: set[str]) -> list[Any]:
    """The nodes ``wanted`` depends on, in graph order."""
    needed = set(wanted)
    kept = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node_reads(node))
    return kept[::-1]


def _edges(groups: list[list[Any]], initializers: set[str], wanted_inputs: list[str], wanted: set[str]) -> list[Piece]:
    producer: dict[str, int] = {}
    last_reader: dict[str, int] = {}
    for index, nodes in enumerate(groups):
        for node in nodes:
            for name in node_reads(node):
                if name not in initializers:
                    last_reader[name] = index
            producer.update((name, index) for name in node.output if name)
    pieces = []
    for index, nodes in enumerate(groups):
        made = [name for node in nodes for name in node.output if name]
        reads = [name for node in nodes for name in node_reads(node)
                 if name not in initializers and producer.get(name, -1) != index]
        pieces.append(Piece(nodes, list(dict.fromkeys(reads)),
                            [name for name in made if last_reader.get(name, index) > index],
                            [name for name in made if name in wanted]))
    if not pieces:
        pieces.append(Piece())
    pieces[0].probes = wanted_inputs + pieces[0].probes
    return pieces


class PieceRunner:
    """Runs the pieces of the model at ``path`` (``skeleton``: it without its data) in order,
    each over every batch; what later pieces read is kept in a scratch folder meanwhile."""

    def __init__(self, skeleton: Any, path: Path, pieces: list[Piece], session: Session) -> None:
        self.skeleton, self.path, self.pieces, self.session = skeleton, path, pieces, session
        self.scratch = Path(tempfile.mkdtemp(prefix="pieces-", dir=path.parent))
        self.types: dict[str, int] = {}
        self.ids: dict[str, int] = {}
        self.graph_inputs = {value.name: value for value in skeleton.graph.input}
        self.initializers = {tensor.name: tensor for tensor in skeleton.graph.initializer}

    def __enter__(self) -> PieceRunner:
        return self

    def __exit__(self, *_: object) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def run(self, index: int, batches: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """``{wanted tensor: value}`` of piece ``index`` for each batch (pieces run in order)."""
        piece = self.pieces[index]
        fetched = piece.keeps + [name for name in piece.probes if name not in self.graph_inputs]
        session = self._session(piece, fetched) if piece.nodes else None
        try:
            for number, feeds in enumerate(batches):
                values: dict[str, Any] = {}
                if session is not None:
                    inputs = {name: feeds[name] if name in self.graph_inputs else self._load(name, number)
                              for name in piece.reads}
                    values = dict(zip(fetched, session.run(fetched, inputs)))
                for name in piece.keeps:
                    self._store(name, number, values[name])
                yield {name: values[name] if name in values else feeds[name] for name in piece.probes}
        finally:
            del session
            release_freed_memory()  # the session's weights and arena, before the next piece's
            self._drop(index)

    def _session(self, piece: Piece, outputs: list[str]) -> Any:
        import onnx
        from onnx import helper

        model = onnx.ModelProto()
        model.CopyFrom(self.skeleton)
        graph = model.graph
        for repeated in (graph.node, graph.input, graph.output, graph.initializer, graph.value_info):
            del repeated[:]
        graph.node.extend(piece.nodes)
        used = {name for node in piece.nodes for name in node_reads(node)}
        graph.initializer.extend(self.initializers[name] for name in self.initializers if name in used)
        graph.input.extend(self.graph_inputs[name] if name in self.graph_inputs
                           else helper.make_tensor_value_info(name, self.types[name], None) for name in piece.reads)
        graph.output.extend(helper.make_empty_tensor_value_info(name) for name in outputs)
        # Beside the model, so its external data resolves; removed once loaded.
        written = self.path.with_name(f"{self.path.stem}-piece.onnx")
        onnx.save_model(model, str(written))
        del model
        try:
            return self.session(written)
        finally:
            written.unlink(missing_ok=True)

    def _file(self, name: str, number: int) -> Path:
        return self.scratch / f"{self.ids.setdefault(name, len(self.ids))}-{number}.npy"

    def _store(self, name: str, number: int, value: Any) -> None:
        import numpy as np
        from onnx import helper

        self.types[name] = helper.np_dtype_to_tensor_dtype(value.dtype)
        np.save(self._file(name, number), value, allow_pickle=False)

    def _load(self, name: str, number: int) -> Any:
        import numpy as np

        return np.load(self._file(name, number), allow_pickle=False)

    def _drop(self, index: int) -> None:
        """Remove what no piece after ``index`` reads."""
        later = {name for piece in self.pieces[index + 1:] for name in piece.reads}
        for name, ident in self.ids.items():
            if name not in later:
                for stored in self.scratch.glob(f"{ident}-*.npy"):
                    os.unlink(stored)
