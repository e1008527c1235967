"""Training a multi-output model with labels: the labels go to the output they belong
to, not output 0. The model is a detector-like two-head network whose output 0 is a
4-value regression (a box head) and output 1 a classifier of 4 classes, so shape alone
cannot tell them apart; real torch, ONNX Runtime, TensorFlow and LiteRT."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from onnx_fixtures import compress_with

from compressor import Dataset, TensorSpec, UsageError
from compressor.cli import cli
from compressor.training_labels import label_output, probe_rows
from compressor_onnx.samples import digits_split

BOX_FIRST = """
import torch

class BoxFirst(torch.nn.Module):
    def __init__(self, width=64):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 64),
                                         torch.nn.ReLU())
        self.boxes = torch.nn.Linear(64, 4)
        self.classes = torch.nn.Linear(64, 4)

    def forward(self, x):
        hidden = self.trunk(x)
        return self.boxes(hidden), self.classes(hidden)

def build():
    return BoxFirst()

def student():
    return BoxFirst(width=16)
"""


def boxes_and_classes(x: np.ndarray, digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The regression target (the mean ink of the four corner quadrants, x10) and the
    4-class label (digit // 3) of each 8x8 digit."""
    quadrants = x.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(-1, 16)[:, [0, 3, 12, 15]] * 10
    return quadrants.astype(np.float32), (digits // 3).astype(np.int64)


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


@pytest.fixture(scope="module")
def box_first(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The trained torch two-head model (state_dict + factory module), its train data
    with the 4-class labels, and its outputs on the test split."""
    import sys

    import torch

    folder = tmp_path_factory.mktemp("box-first")
    (folder / "box_first.py").write_text(BOX_FIRST)
    sys.path.insert(0, str(folder))
    import box_first as module

    split = digits_split()
    boxes, classes = boxes_and_classes(split.train_x, split.train_y)
    torch.manual_seed(0)
    model = module.build()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.from_numpy(split.train_x)
    for _ in range(15):
        for start in range(0, len(x), 64):
            box, scores = model(x[start:start + 64])
            loss = (torch.nn.functional.mse_loss(box, torch.from_numpy(boxes[start:start + 64]))
                    + torch.nn.functional.cross_entropy(scores, torch.from_numpy(classes[start:start + 64])))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.save(model.state_dict(), folder / "box_first.pt")
    np.savez(folder / "train.npz", x=split.train_x, y=classes)
    with torch.no_grad():
        expected = [tensor.numpy() for tensor in model.eval()(torch.from_numpy(split.test_x))]
    yield {"folder": folder, "weights": folder / "box_first.pt", "train": folder / "train.npz",
           "expected": expected, "test_x": split.test_x, "test_classes": split.test_y // 3}
    sys.path.remove(str(folder))
    sys.modules.pop("box_first", None)


def onnx_outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def onnx_compress(box_first: dict[str, Any], step: str, folder: Path, **options: str) -> tuple[Any, list[np.ndarray]]:
    from compressor_onnx import plugin

    model, artifact = compress_with(plugin, "onnx", box_first["weights"], [step], folder,
                                    {"model_factory": "box_first:build", **options}, train=box_first["train"])
    return model, onnx_outputs(artifact.path, box_first["test_x"])


def test_fine_tuning_after_prune_trains_the_labels_on_the_classifier_not_the_box_head(
        box_first: dict[str, Any], tmp_path: Path) -> None:
    """Output 0 is the box head, [N, 4] like the 4-class output 1: the labels went to
    output 0 (cross-entropy on the boxes) and fine-tuning made the boxes worse than
    one-shot pruning (measured: relative error 0.78 one-shot, 0.91 fine-tuned). Now
    the labels go to output 1, whose top-1 agrees with them, and the boxes are matched
    to the original's (0.36)."""
    expected_boxes, expected_scores = box_first["expected"]
    _, (once_boxes, _) = onnx_compress(box_first, "prune 0.75 structure=channel epochs=0", tmp_path / "once")
    tuned, (tuned_boxes, tuned_scores) = onnx_compress(box_first, "prune 0.75 structure=channel epochs=3",
                                                       tmp_path / "tuned")
    one_shot, fine_tuned = relative_error(once_boxes, expected_boxes), relative_error(tuned_boxes, expected_boxes)
    assert fine_tuned < 0.6 * one_shot, (one_shot, fine_tuned)
    facts = tuned.metadata["fine_tuning"]
    assert facts["label_output"] == "output_1"
    assert facts["loss"] == ("MSE over the variance on output_0; KL on softened logits + cross-entropy on labels "
                             "on output_1")
    assert any(note.startswith("labels y train output output_1 (top-1 agreement with 64 training labels: "
                               "output_0 ") for note in tuned.notes), tuned.notes
    assert (tuned_scores.argmax(1) == box_first["test_classes"]).mean() > 0.9
    assert (tuned_scores.argmax(1) == expected_scores.argmax(1)).mean() > 0.9


def test_a_declared_label_output_decides_and_a_wrong_one_is_refused(box_first: dict[str, Any],
                                                                      tmp_path: Path) -> None:
    tuned, _ = onnx_compress(box_first, "prune 0.75 structure=channel epochs=1", tmp_path / "a",
                             label_output="output_1")
    assert tuned.metadata["fine_tuning"]["label_output"] == "output_1"
    assert "labels y train output output_1 (--set label_output)" in tuned.notes[-1]
    with pytest.raises(UsageError, match=r"--set label_output=scores: the model has no output 'scores' "
                                         r"\(its outputs: output_0, output_1\)"):
        onnx_compress(box_first, "prune 0.75 structure=channel epochs=1", tmp_path / "b", label_output="scores")


def test_qat_and_distill_of_the_two_head_model_put_the_labels_on_the_classifier(box_first: dict[str, Any],
                                                                                tmp_path: Path) -> None:
    expected_boxes, _ = box_first["expected"]
    qat, (qat_boxes, qat_scores) = onnx_compress(box_first, "qat epochs=1", tmp_path / "qat")
    # Cross-entropy on the boxes made them useless (relative error 0.48); matched, they stay close (0.03).
    assert relative_error(qat_boxes, expected_boxes) < 0.15
    assert qat.metadata["qat"]["label_output"] == "output_1"
    assert "against cross-entropy on the labels through output_1" in qat.notes[0]
    assert (qat_scores.argmax(1) == box_first["test_classes"]).mean() > 0.9
    distilled, _ = onnx_compress(box_first, "distill student=box_first:student epochs=2", tmp_path / "d")
    assert distilled.metadata["distillation"]["label_output"] == "output_1"


def test_the_torch_backend_fine_tunes_with_the_labels_on_the_classifier(box_first: dict[str, Any],
                                                                         tmp_path: Path) -> None:
    from compressor_torch import plugin

    model, _ = compress_with(plugin, "torch", box_first["weights"], ["prune 0.75 structure=channel epochs=1"],
                             tmp_path, {"model_factory": "box_first:build"}, train=box_first["train"])
    assert model.metadata["fine_tuning"]["label_output"] == "output_1"


def test_the_label_output_is_the_one_that_agrees_with_the_labels() -> None:
    """The choice itself, on arrays: two [N, 4] outputs, the second a classifier of the labels."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    boxes = rng.normal(5, 2, (200, 4)).astype(np.float32)
    logits = (np.eye(4)[labels] * 3 + rng.normal(0, 1, (200, 4))).astype(np.float32)
    train = Dataset(Path("train.npz"), {"x": np.zeros((200, 2), np.float32)}, labels, 200)
    inputs = [TensorSpec("x", (None, 2), "float32")]
    rows = probe_rows(200)
    choice = label_output(["output_0", "output_1"], [boxes[rows], logits[rows]], inputs, {}, train, rows)
    assert (choice.index, choice.name) == (1, "output_1")
    # Neither agrees with the labels: they are left unused, and the note says how to name one.
    unused = label_output(["output_0", "output_1"], [boxes[rows], boxes[rows][:, ::-1]], inputs, {}, train, rows)
    assert unused.index is None
    assert unused.note.startswith("labels y unused: no output of class scores agrees with them")
    assert "--set label_output=NAME" in unused.note
    # One output: a regression is trained without the labels; a classifier too small for them is refused.
    single = label_output(["boxes"], [boxes[rows]], inputs, {}, train, rows)
    assert single.index is None and "labels y unused: output boxes is no classifier" in single.note
    with pytest.raises(UsageError, match="the train data has label 3, the model 3 classes"):
        label_output(["output"], [logits[rows][:, :3]], inputs, {}, train, rows)
    # One logit per example that 0/1 labels agree with is a binary classifier, not a regression.
    binary = (labels % 2).astype(np.int64)
    logit = ((binary * 2 - 1) * 3 + rng.normal(0, 1, 200)).astype(np.float32)[:, None]
    binary_train = Dataset(Path("train.npz"), train.features, binary, 200)
    assert label_output(["output"], [logit[rows]], inputs, {}, binary_train, rows).index == 0
    assert label_output(["output"], [-np.abs(logit[rows])], inputs, {}, binary_train, rows).index is None


def keras_box_first(folder: Path) -> dict[str, Any]:
    """The same two-head model in Keras (heads ``head0``: boxes, ``head1``: 4 classes)."""
    from compressor_frontends.keras import frameworks
    from compressor_tflite.samples import digits

    keras = frameworks.keras()
    keras.utils.set_random_seed(0)
    train_x, train_y, test_x, _ = digits()
    flat, flat_test = train_x.reshape(len(train_x), -1), test_x.reshape(len(test_x), -1)
    boxes, classes = boxes_and_classes(flat, train_y)
    inputs = keras.Input((64,), name="x")
    hidden = keras.layers.Dense(64, activation="relu")(inputs)
    hidden = keras.layers.Dense(64, activation="relu")(hidden)
    model = keras.Model(inputs, [keras.layers.Dense(4, name="head0")(hidden),
                                 keras.layers.Dense(4, name="head1")(hidden)])
    model.compile(optimizer="adam", loss=["mse", keras.losses.SparseCategoricalCrossentropy(from_logits=True)])
    model.fit(flat, [boxes, classes], epochs=10, batch_size=32, verbose=0)
    model.save(folder / "two.keras")
    np.savez(folder / "train.npz", x=flat[:600], y=classes[:600])
    np.savez(folder / "eval.npz", x=flat_test[:100])
    return {"model": folder / "two.keras", "train": folder / "train.npz", "eval": folder / "eval.npz",
            "test_x": flat_test, "expected": model.predict(flat_test, verbose=0)[0]}


def tflite_variant(files: dict[str, Any], step: str, folder: Path) -> tuple[dict[str, Any], np.ndarray]:
    """Run ``step`` through the CLI: the variant's report entry and its box head's outputs."""
    from compressor_tflite import frameworks

    recipe = folder / "recipe.toml"
    folder.mkdir()
    recipe.write_text(f'[variants.v]\nsteps = ["{step}"]\n')
    result = CliRunner().invoke(cli, ["run", str(files["model"]), "--recipe", str(recipe), "--train-data",
                                      str(files["train"]), "--data", str(files["eval"]), "-o", str(folder / "out"),
                                      "--min-seconds", "0"])
    assert result.exit_code == 0, result.output
    variant = next(v for v in json.loads((folder / "out" / "report.json").read_text())["variants"]
                   if v["name"] == "v")
    loaded = frameworks.interpreter_class()[0](model_path=str(folder / "out" / variant["artifact"]))
    loaded.allocate_tensors()
    # Both heads are [1, 4]: the box head is the one closer to the original's boxes.
    details = loaded.get_output_details()
    rows: list[list[np.ndarray]] = [[] for _ in details]
    for row in files["test_x"].astype(np.float32):
        loaded.set_tensor(loaded.get_input_details()[0]["index"], row[None])
        loaded.invoke()
        for found, detail in zip(rows, details):
            found.append(loaded.get_tensor(detail["index"])[0])
    heads = [np.array(found) for found in rows]
    return variant, min(heads, key=lambda head: relative_error(head, files["expected"]))


def test_keras_fine_tuning_after_prune_trains_the_labels_on_the_classifier(tmp_path: Path) -> None:
    """tflite: with several outputs the labels were not used at all; now they train
    head1 (cross-entropy) while head0, the boxes, is matched to the original's
    (measured: relative error 0.80 one-shot, 0.22 fine-tuned)."""
    files = keras_box_first(tmp_path)
    _, once = tflite_variant(files, "prune 0.75 structure=channel epochs=0", tmp_path / "once")
    tuned, boxes = tflite_variant(files, "prune 0.75 structure=channel epochs=3", tmp_path / "tuned")
    assert "fine-tuned 3 epoch(s) on train.npz (cross-entropy on the labels through head1 (top-1 agreement" \
        in tuned["notes"][0], tuned["notes"]
    one_shot, fine_tuned = relative_error(once, files["expected"]), relative_error(boxes, files["expected"])
    assert fine_tuned < 0.6 * one_shot, (one_shot, fine_tuned)
