"""segments.py: a model on disk run piece by piece gives the tensors the whole graph gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor_onnx.external import load_skeleton
from compressor_onnx.segments import PieceRunner, plan_pieces

WIDTH = 16


def write_graph(folder: Path) -> Path:
    """Two inputs; a skip connection read three pieces later; one weight read by two MatMuls far
    apart; an ``If`` whose branches read a tensor of the outer graph; a branch nothing wanted
    needs; weights in an external data file."""
    rng = np.random.default_rng(0)

    def weight(name: str) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) / 4, name)

    branch_out = helper.make_tensor_value_info("branch", TensorProto.FLOAT, None)
    then = helper.make_graph([helper.make_node("Relu", ["h1"], ["branch"])], "then", [], [branch_out])
    other = helper.make_graph([helper.make_node("Neg", ["h1"], ["branch"])], "else", [], [branch_out])
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"], "mm0"),
        helper.make_node("Tanh", ["h0"], ["skip"], "tanh"),
        helper.make_node("MatMul", ["skip", "w1"], ["h1"], "mm1"),
        helper.make_node("ReduceSum", ["flag"], ["flag_sum"], "sum", keepdims=0),
        helper.make_node("Cast", ["flag_sum"], ["cond"], "cast", to=TensorProto.BOOL),
        helper.make_node("If", ["cond"], ["branch"], "if", then_branch=then, else_branch=other),
        helper.make_node("MatMul", ["branch", "w2"], ["h2"], "mm2"),
        helper.make_node("MatMul", ["h2", "shared"], ["h3"], "mm3"),
        helper.make_node("Add", ["h3", "skip"], ["h4"], "residual"),
        helper.make_node("MatMul", ["h4", "shared"], ["y"], "mm4"),
        helper.make_node("MatMul", ["x", "unused"], ["side"], "side"),
    ]
    graph = helper.make_graph(
        nodes, "pieces",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH]),
         helper.make_tensor_value_info("flag", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", WIDTH]),
         helper.make_tensor_value_info("side", TensorProto.FLOAT, ["n", WIDTH])],
        [weight(name) for name in ("w0", "w1", "w2", "shared", "unused")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return path


WANTED = ["x", "h1", "branch", "h2", "h4", "y"]


def whole(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in WANTED[1:-1])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return {"x": feeds["x"], **dict(zip(WANTED[1:], session.run(WANTED[1:], feeds)))}


@pytest.mark.parametrize("flag", [1.0, 0.0])
def test_pieces_give_the_whole_graphs_tensors(tmp_path: Path, flag: float) -> None:
    path = write_graph(tmp_path / "model")
    skeleton = load_skeleton(path)
    pieces = plan_pieces(skeleton.graph, WANTED, budget=1)  # every weight starts a piece
    assert len(pieces) >= 4
    assert "side" not in {name for piece in pieces for node in piece.nodes for name in node.output}
    assert "skip" in pieces[0].keeps and pieces[0].probes[0] == "x"
    # The If reads h1 from the outer graph: the piece holding it reads h1 from an earlier one.
    holding_if = next(piece for piece in pieces if any(node.op_type == "If" for node in piece.nodes))
    assert "h1" in holding_if.reads or any(node.output[0] == "h1" for node in holding_if.nodes)
    rng = np.random.default_rng(1)
    batches = [{"x": rng.standard_normal((rows, WIDTH)).astype(np.float32), "flag": np.array([flag], np.float32)}
               for rows in (3, 5)]
    got: list[dict[str, np.ndarray]] = [{}, {}]
    with PieceRunner(skeleton, path, pieces, lambda written: ort.InferenceSession(str(written))) as runner:
        for index in range(len(pieces)):
            for number, values in enumerate(runner.run(index, batches)):
                assert not got[number].keys() & values.keys()
                got[number].update(values)
        scratch = runner.scratch
    assert not scratch.exists() and sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    for feeds, values in zip(batches, got):
        expected = whole(path, feeds)
        assert values.keys() == expected.keys()
        for name, array in expected.items():
            np.testing.assert_array_equal(values[name], array, err_msg=name)


def test_one_piece_within_the_budget_and_unknown_names_refused(tmp_path: Path) -> None:
    skeleton = load_skeleton(write_graph(tmp_path / "model"))
    pieces = plan_pieces(skeleton.graph, WANTED, budget=1 << 30)
    assert len(pieces) == 1 and pieces[0].keeps == []
    assert sorted(pieces[0].reads) == ["flag", "x"]
    with pytest.raises(ValueError, match="no tensor named nothing"):
        plan_pieces(skeleton.graph, ["y", "nothing"], budget=1)
