"""ONNX files that are valid protobuf but hostile or odd: every tensor's external
data is contained (sparse initializers and Constant values too), malformed
external-data fields and unusual input types are one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_faults import INVALID, UNSAFE, UNSUPPORTED, check_refused


def _save(model: object, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())  # type: ignore[attr-defined]
    return path


def _external(tensor: object, location: str, **fields: str) -> None:
    from onnx import TensorProto

    tensor.ClearField("raw_data")  # type: ignore[attr-defined]
    tensor.ClearField("float_data")  # type: ignore[attr-defined]
    tensor.ClearField("int64_data")  # type: ignore[attr-defined]
    tensor.data_location = TensorProto.EXTERNAL  # type: ignore[attr-defined]
    del tensor.external_data[:]  # type: ignore[attr-defined]
    for key, value in {"location": location, **fields}.items():
        entry = tensor.external_data.add()  # type: ignore[attr-defined]
        entry.key, entry.value = key, value


def _matmul_model(weight_name: str = "w") -> object:
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 2), dtype=np.float32), weight_name)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", weight_name], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])], [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _with_secret(tmp_path: Path) -> Path:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(8, dtype=np.float32).tobytes())
    return secret


def test_a_sparse_initializer_reading_outside_the_folder_is_unsafe(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    secret = _with_secret(tmp_path)
    values = helper.make_tensor("w_values", TensorProto.FLOAT, [2], [1.0, 2.0])
    indices = helper.make_tensor("w_indices", TensorProto.INT64, [2], [0, 5])
    _external(values, str(secret), offset="0", length="8")
    sparse = helper.make_sparse_tensor(values, indices, [4, 2])
    sparse.values.name = "w"
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        sparse_initializer=[sparse],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = _save(model, tmp_path / "in" / "sparse.onnx")
    check_refused(path, UNSAFE, "absolute path", tmp_path, "-q", "dynamic")


def test_a_constant_node_reading_outside_the_folder_is_unsafe(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    secret = _with_secret(tmp_path)
    value = numpy_helper.from_array(np.zeros((4, 2), dtype=np.float32), "c")
    _external(value, "../secret.bin", offset="0", length="32")
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=value), helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = _save(model, tmp_path / "in" / "constant.onnx")
    assert secret.exists()
    check_refused(path, UNSAFE, "outside the model's folder", tmp_path, "-q", "dynamic")


@pytest.mark.parametrize("fields, message", [
    ({"offset": "twelve"}, "non-numeric external-data offset"),
    ({"length": "0x20"}, "non-numeric external-data length"),
])
def test_malformed_external_data_fields_are_invalid(tmp_path: Path, fields: dict[str, str], message: str) -> None:
    model = _matmul_model()
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "w.bin").write_bytes(bytes(32))
    _external(model.graph.initializer[0], "w.bin", **fields)  # type: ignore[attr-defined]
    check_refused(_save(model, folder / "m.onnx"), INVALID, message, tmp_path, "-q", "dynamic")


def test_an_unknown_tensor_data_type_is_invalid(tmp_path: Path) -> None:
    model = _matmul_model()
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "w.bin").write_bytes(bytes(32))
    tensor = model.graph.initializer[0]  # type: ignore[attr-defined]
    _external(tensor, "w.bin")
    tensor.data_type = 999
    check_refused(_save(model, folder / "m.onnx"), INVALID, "unknown data type", tmp_path, "-q", "dynamic")


def test_a_model_with_a_string_input_is_unsupported_in_one_line(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["out"])], "g",
        [helper.make_tensor_value_info("text", TensorProto.STRING, [None])],
        [helper.make_tensor_value_info("out", TensorProto.STRING, [None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = _save(model, tmp_path / "in" / "strings.onnx")
    check_refused(path, UNSUPPORTED, "string", tmp_path, "-q", "dynamic")


def test_a_model_with_a_sequence_input_is_unsupported_in_one_line(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    sequence = helper.make_tensor_sequence_value_info("items", TensorProto.FLOAT, None)
    graph = helper.make_graph(
        [helper.make_node("SequenceLength", ["items"], ["count"])], "g", [sequence],
        [helper.make_tensor_value_info("count", TensorProto.INT64, [])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = _save(model, tmp_path / "in" / "sequences.onnx")
    check_refused(path, UNSUPPORTED, "sequence", tmp_path, "-q", "dynamic")
