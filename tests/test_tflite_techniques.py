"""``qat`` and ``distill`` on the tflite backend, through the CLI with real TensorFlow,
tensorflow-model-optimization and LiteRT: QAT output is full-integer and keeps a pruned
model's zeros, a distilled student has the requested size, and bad requests stop
before any work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from compressor import Context, Step
from compressor.cli import cli
from compressor.validation import validate_step
from compressor_tflite import frameworks
from compressor_tflite import plugin as tflite_plugin
from compressor_tflite.convert import float_ops

FAST = ["--min-seconds", "0"]


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(arg) for arg in args])
    return result.exit_code, result.output


def run(files: dict[str, Path], folder: Path, steps: dict[str, list[str]],
        train: Path) -> dict[str, dict[str, Any]]:
    recipe = folder / "recipe.toml"
    recipe.write_text("".join(f"[variants.{name}]\nsteps = {json.dumps(chain)}\n" for name, chain in steps.items()))
    out = folder / "out"
    code, output = invoke("run", files["model"], "--recipe", recipe, "--train-data", train, "--data", files["eval"],
                          "-o", out, *FAST)
    assert code == 0, output
    report = json.loads((out / "report.json").read_text())
    return {v["name"]: {**v, "path": out / v["artifact"]} for v in report["variants"]}


def interpreter(path: Path) -> Any:
    loaded = frameworks.interpreter_class()[0](model_path=str(path))
    loaded.allocate_tensors()
    return loaded


def small_student() -> Any:
    """A factory for the tests' digits CNN: one narrow convolution and a Dense head."""
    keras = frameworks.keras()
    inputs = keras.Input((8, 8, 1), name="image")
    hidden = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    hidden = keras.layers.MaxPooling2D()(hidden)
    hidden = keras.layers.Flatten()(hidden)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(hidden))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small digits CNN (Conv 8, Conv 16, Dense 32) trained briefly, and its data files."""
    from compressor_tflite.samples import digits, small_cnn

    folder = tmp_path_factory.mktemp("tflite-techniques")
    keras = frameworks.keras()
    keras.utils.set_random_seed(0)
    train_x, train_y, test_x, test_y = digits()
    model = small_cnn(filters=8, dense=32)
    model.fit(train_x, train_y, epochs=5, batch_size=32, verbose=0)
    paths = {name: folder / f"{name}.npz" for name in ("train", "unlabelled", "eval")}
    paths["model"] = folder / "cnn.keras"
    model.save(paths["model"])
    np.savez(paths["train"], x=train_x[:600], y=train_y[:600])
    np.savez(paths["unlabelled"], x=train_x[:600])
    np.savez(paths["eval"], x=test_x[:200], y=test_y[:200])
    return paths


def test_pruned_model_through_qat_is_full_integer_accurate_and_keeps_its_zeros(files: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    report = run(files, tmp_path, {"pruned-qat": ["prune 0.6 epochs=2", "qat epochs=1"]}, files["train"])
    original, pruned = report["original"], report["pruned-qat"]
    facts = pruned["metadata"]["qat"]
    assert pruned["metadata"]["quantization"] == "int8" and facts["labels"] is True
    assert pruned["metrics"]["accuracy"] >= original["metrics"]["accuracy"] - 0.05
    assert float_ops(pruned["path"].read_bytes()) == []
    loaded = interpreter(pruned["path"])
    assert [d["dtype"] for d in loaded.get_input_details() + loaded.get_output_details()] == [np.int8] * 2
    # The original's output name, not tfmot's "quant_..." rename (Keras numbers names per process).
    original_outputs = interpreter(original["path"]).get_signature_list()["serving_default"]["outputs"]
    assert loaded.get_signature_list()["serving_default"]["outputs"] == original_outputs
    assert not original_outputs[0].startswith("quant")
    kernels = [loaded.get_tensor(d["index"]) for d in loaded.get_tensor_details()
               if d["dtype"] == np.int8 and len(d["shape"]) >= 2 and d["shape"][0] > 1]
    assert {k.shape for k in kernels} >= {(8, 3, 3, 1), (16, 3, 3, 8), (32, 256), (10, 32)}
    zeros = sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels)
    assert zeros > 0.55, zeros  # the saved int8 weights keep the pruned zeros
    assert facts["sparsity_before"] == pytest.approx(0.6, abs=0.01)
    assert facts["sparsity_after"] == facts["sparsity_before"]
    assert "prune-preserving" in pruned["notes"][-1]


def test_distill_derived_student_then_quantize(files: dict[str, Path], tmp_path: Path) -> None:
    report = run(files, tmp_path, {"student": ["distill width=0.5 epochs=6 learning_rate=0.01", "quantize dynamic"]}, files["train"])
    original, student = report["original"], report["student"]
    facts = student["metadata"]["distillation"]
    assert facts["labels"] is True and facts["student"] == "width=0.5"
    assert facts["parameters_student"] < facts["parameters_teacher"] / 3
    shapes = {tuple(d["shape"]) for d in interpreter(student["path"]).get_tensor_details()}
    assert (4, 3, 3, 1) in shapes and (8, 3, 3, 1) not in shapes  # conv filters 8 -> 4 (OHWI)
    assert (16, 128) in shapes and (32, 256) not in shapes  # Dense 32 -> 16 units on 4x4x8 inputs
    assert student["metrics"]["size_bytes"] < original["metrics"]["size_bytes"] / 5
    assert student["metrics"]["agreement"] > 0.5  # chance: 0.1
    assert "0.5 x soft loss (T=2) + 0.5 x label cross-entropy" in student["notes"][0]


def test_distill_factory_student_without_labels(files: dict[str, Path], tmp_path: Path) -> None:
    from compressor.builtin import read_npz

    teacher = tflite_plugin.compressor_load(files["model"], "tflite", Context())
    train = read_npz(files["unlabelled"], teacher.inputs)
    backend = next(tflite_plugin.compressor_backends())
    step = validate_step(backend, Step("distill", {"student": "test_tflite_techniques:small_student",
                                                   "epochs": "6", "learning_rate": "0.005"}))
    student = tflite_plugin.compressor_compress(teacher, step, Context(train_data=train))
    facts = student.metadata["distillation"]
    assert facts["labels"] is False and facts["alpha"] == 1.0
    assert facts["parameters_student"] == small_student().count_params()
    assert "soft loss only" in student.notes[-1]
    artifact = tflite_plugin.compressor_save(student, tmp_path / "student", Context())
    with np.load(files["eval"]) as data:
        x = data["x"]
    loaded = frameworks.interpreter_class()[0](model_path=str(artifact.path))
    runner = loaded.get_signature_runner()
    outputs = [next(iter(runner(image=x[i:i + 50]).values())) for i in range(0, len(x), 50)]
    predicted = np.concatenate(outputs).argmax(1)
    agreement = float(np.mean(predicted == teacher.handle.keras_model.predict(x, verbose=0).argmax(1)))
    assert agreement > 0.5, agreement


@pytest.mark.parametrize(("step", "train", "message"), [
    ("qat", False, "'qat' needs --train-data"),
    ("distill width=0.5", False, "'distill width=0.5' needs --train-data"),
    ("distill student=no_colon", True, "student 'no_colon' is not 'package.module:function'"),
    ("distill student=no_such_module_here:build", True, "cannot import student"),
    ("distill width=0", True, "width='0' must be a number between 0 and 1"),
    ("distill width=1.5", True, "width='1.5' must be a number between 0 and 1"),
])
def test_bad_requests_stop_before_work(files: dict[str, Path], tmp_path: Path, step: str, train: bool,
                                       message: str) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f"[variants.v]\nsteps = [{json.dumps(step)}]\n")
    data = ["--train-data", files["train"]] if train else []
    code, output = invoke("run", files["model"], "--recipe", recipe, *data, "--data", files["eval"],
                          "-o", tmp_path / "out")
    assert code == 2, output
    assert message in output and len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / "out").exists()


def test_fine_tuning_without_labels_matches_every_output_of_a_two_head_model(tmp_path: Path) -> None:
    """A detector-like Keras model (class scores and a regression head) fine-tuned after
    channel pruning on unlabelled data: both outputs are matched to the unpruned model's."""
    from compressor_tflite.samples import digits

    keras = frameworks.keras()
    keras.utils.set_random_seed(0)
    train_x, train_y, test_x, _ = digits()
    flat, flat_test = train_x.reshape(len(train_x), -1), test_x.reshape(len(test_x), -1)
    quadrants = train_x.reshape(-1, 2, 4, 2, 4).mean(axis=(2, 4)).reshape(-1, 4) * 10
    inputs = keras.Input((64,), name="x")
    hidden = keras.layers.Dense(64, activation="relu")(inputs)
    hidden = keras.layers.Dense(64, activation="relu")(hidden)
    model = keras.Model(inputs, [keras.layers.Dense(10, name="classes")(hidden),
                                 keras.layers.Dense(4, name="quadrants")(hidden)])
    model.compile(optimizer="adam", loss=[keras.losses.SparseCategoricalCrossentropy(from_logits=True), "mse"])
    model.fit(flat, [train_y, quadrants], epochs=10, batch_size=32, verbose=0)
    model.save(tmp_path / "two.keras")
    expected = model.predict(flat_test, verbose=0)[1]
    np.savez(tmp_path / "unlabelled.npz", x=flat[:600])
    np.savez(tmp_path / "eval.npz", x=flat_test[:200])

    def second_head_error(epochs: int) -> float:
        recipe = tmp_path / f"r{epochs}.toml"
        recipe.write_text(f'[variants.v]\nsteps = ["prune 0.75 structure=channel epochs={epochs}"]\n')
        out = tmp_path / f"out{epochs}"
        code, output = invoke("run", tmp_path / "two.keras", "--recipe", recipe, "--train-data",
                              tmp_path / "unlabelled.npz", "--data", tmp_path / "eval.npz", "-o", out, *FAST)
        assert code == 0, output
        variant = next(v for v in json.loads((out / "report.json").read_text())["variants"] if v["name"] == "v")
        loaded = interpreter(out / variant["artifact"])
        head = next(d["index"] for d in loaded.get_output_details() if d["shape"][-1] == 4)
        got = []
        for row in flat_test.astype(np.float32):
            loaded.set_tensor(loaded.get_input_details()[0]["index"], row[None])
            loaded.invoke()
            got.append(loaded.get_tensor(head)[0])
        return float(((np.array(got) - expected) ** 2).mean() / expected.var())

    one_shot, tuned = second_head_error(0), second_head_error(3)
    assert tuned < one_shot / 2, (one_shot, tuned)
    # qat on the same model: both outputs trained against the float model, full integer.
    recipe = tmp_path / "qat.toml"
    recipe.write_text('[variants.q]\nsteps = ["qat epochs=1"]\n')
    code, output = invoke("run", tmp_path / "two.keras", "--recipe", recipe, "--train-data",
                          tmp_path / "unlabelled.npz", "--calibration-data", tmp_path / "unlabelled.npz",
                          "--data", tmp_path / "eval.npz", "-o", tmp_path / "qat", *FAST)
    assert code == 0, output
    variant = next(v for v in json.loads((tmp_path / "qat" / "report.json").read_text())["variants"]
                   if v["name"] == "q")
    assert "against the float model's outputs, then int8" in variant["notes"][-1]
    assert float_ops((tmp_path / "qat" / variant["artifact"]).read_bytes()) == []
    assert len(variant["metrics"]["outputs"]) == 2
    # distill into a half-width student: both outputs distilled.
    recipe.write_text('[variants.d]\nsteps = ["distill width=0.5 epochs=2"]\n')
    code, output = invoke("run", tmp_path / "two.keras", "--recipe", recipe, "--train-data",
                          tmp_path / "unlabelled.npz", "--data", tmp_path / "eval.npz", "-o", tmp_path / "d", *FAST)
    assert code == 0, output
    variant = next(v for v in json.loads((tmp_path / "d" / "report.json").read_text())["variants"]
                   if v["name"] == "d")
    assert "2 outputs, every output matched to the teacher's" in variant["notes"][-1]
    assert variant["metadata"]["distillation"]["parameters_student"] < variant["metadata"]["distillation"][
        "parameters_teacher"] / 2
