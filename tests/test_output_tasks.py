"""Every output is compared by the figure its users read: maps per pixel over their channel
axis, anchor heads and box + score pairs by their detections, CTC by decoded strings,
multi-label by F1, one probability as a decision; NaN outputs are flagged and fail budgets.

Models are ONNX graphs built in the test and run by ONNX Runtime: through the whole
pipeline (``compressor run``) where a real compression makes the variant, in this
process with the onnx backend's runtime where the variant is a second graph (a
recogniser that outputs only blanks, a detector that finds nothing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import output_task_models as models
import pytest
from click.testing import CliRunner

from compressor import tasks
from compressor.cli import cli
from compressor.errors import UsageError


def run(*args: object) -> Any:
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def report_of(out: Path) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in json.loads((out / "report.json").read_text())["variants"]}


def fp16_run(model: Path, data: Path, out: Path, *extra: object) -> Any:
    return run("run", model, "-q", "fp16", "--data", data, "--min-seconds", "0", "-o", out, *extra)


def test_a_channel_first_face_map_is_compared_per_pixel_over_its_channels(tmp_path: Path) -> None:
    model = models.face_map(tmp_path / "pnet.onnx")
    data = models.features(tmp_path / "eval.npz", (10, 3, 12, 16))
    out = tmp_path / "out"
    result = fp16_run(model, data, out)
    assert result.exit_code == 0, result.output
    variants = report_of(out)
    outputs = variants["fp16"]["metrics"]["outputs"]
    face, offsets = outputs["prob"], outputs["reg"]
    assert face["task"] == "map" and face["params"] == {"channel_axis": 1}
    assert "probabilities over 2 channels (axis 1)" in face["reason"]
    assert offsets["task"] == "regression" and "beside 'prob'" in offsets["reason"]
    # The figure is the share of pixels whose argmax over the channel axis is the original's.
    before = models.run_onnx(out / "original.onnx", data)["prob"].argmax(axis=1)
    after = models.run_onnx(out / "fp16.onnx", data)["prob"].argmax(axis=1)
    assert face["agreement"] == face["pixel_agreement"] == pytest.approx(float((before == after).mean()))
    assert face["headline_metric"] == "pixel_agreement" and face["agreement"] > 0.99
    assert variants["fp16"]["metrics"]["agreement"] == face["agreement"]
    assert not any("agrees" in warning for warning in variants["fp16"]["warnings"])
    assert f"px {100 * face['agreement']:.2f}%" in result.output
    assert "output prob: map, [N, 2, 12, 16]: class probabilities" in result.output
    assert "--set task.prob=TASK" in result.output


def test_a_one_channel_probability_map_is_decided_at_one_half(tmp_path: Path) -> None:
    data = models.features(tmp_path / "eval.npz", (8, 3, 12, 16))
    original, variant = models.text_map(tmp_path / "a.onnx"), models.text_map(tmp_path / "b.onnx", bias=0.4)
    compared = models.measure_and_compare(original, variant, data)
    entry = compared.metrics["outputs"]["map"]
    assert entry["task"] == "map" and entry["params"] == {"channel_axis": 1, "threshold": 0.5}
    before = models.run_onnx(original, data)["map"] > 0.5
    after = models.run_onnx(variant, data)["map"] > 0.5
    assert entry["pixel_agreement"] == pytest.approx(float((before == after).mean()))
    assert entry["foreground_iou"] == pytest.approx(float((before & after).sum() / (before | after).sum()))
    assert 0.5 < entry["agreement"] < 1.0


def test_an_anchor_head_is_compared_by_its_detections(tmp_path: Path) -> None:
    data = models.anchor_data(tmp_path / "eval.npz")
    original = models.anchor_head(tmp_path / "yolo.onnx")
    same = models.measure_and_compare(original, models.anchor_head(tmp_path / "copy.onnx"), data)
    entry = same.metrics["outputs"]["output0"]
    assert entry["task"] == "detection" and entry["params"]["layout"] == "anchors"
    assert entry["params"]["numbers_axis"] == 1 and entry["params"]["objectness"] is False
    scores = models.run_onnx(original, data)["output0"][:, 4:].max(axis=1)
    found = entry["detections"]["original"]
    assert 0 < found <= int((scores > 0.25).sum())
    assert entry["detection_f1"] == entry["recall"] == entry["precision"] == entry["agreement"] == 1.0
    # A pruned detector that finds nothing: 0, not a cosine of 0.9.
    silent = models.anchor_head(tmp_path / "pruned.onnx", score_bias=-100.0)
    broken = models.measure_and_compare(original, silent, data).metrics
    detections = broken["outputs"]["output0"]
    assert detections["detections"] == {"original": found, "variant": 0, "matched": 0}
    assert detections["recall"] == 0.0 and detections["agreement"] == broken["agreement"] == 0.0
    assert "cosine" not in detections


def test_a_box_and_score_pair_is_compared_by_its_detections(tmp_path: Path) -> None:
    data = models.pair_data(tmp_path / "eval.npz")
    original = models.box_score_pair(tmp_path / "ultraface.onnx")
    same = models.measure_and_compare(original, models.box_score_pair(tmp_path / "copy.onnx"), data).metrics
    boxes, scores = same["outputs"]["boxes"], same["outputs"]["scores"]
    assert boxes["task"] == scores["task"] == "detection"
    assert boxes["params"]["layout"] == "pair" and boxes["params"]["scores"] == "scores"
    assert boxes["params"]["box_format"] == "xyxy" and boxes["params"]["background"] == 0
    assert scores["compared_with"] == "boxes" and "agreement" not in scores
    faces = models.run_onnx(original, data)["scores"][..., 1]
    assert 0 < boxes["detections"]["original"] <= int((faces > 0.25).sum())
    assert boxes["agreement"] == 1.0
    moved = models.measure_and_compare(original, models.box_score_pair(tmp_path / "moved.onnx", box_offset=5.0),
                                       data).metrics
    assert moved["outputs"]["boxes"]["recall"] == 0.0 and moved["agreement"] == 0.0
    assert moved["outputs"]["boxes"]["detections"]["variant"] == boxes["detections"]["original"]


@pytest.mark.parametrize("time_major", [False, True], ids=["NTC", "TNC"])
def test_a_ctc_recogniser_that_outputs_only_blanks_matches_no_string(tmp_path: Path, time_major: bool) -> None:
    data = models.features(tmp_path / "eval.npz", (16, 24, 6))
    original = models.ctc_recognizer(tmp_path / "crnn.onnx", time_major=time_major)
    blanks = models.ctc_recognizer(tmp_path / "blanks.onnx", blank_bias=100.0, time_major=time_major)
    compared = models.measure_and_compare(original, blanks, data)
    entry = compared.metrics["outputs"]["out"]
    assert entry["task"] == "ctc" and entry["params"]["blank"] == 0
    assert entry["params"]["class_axis"] == (3 if time_major else 2)
    assert entry["empty_strings"] == {"original": 0, "variant": 16}
    assert entry["exact_match"] == entry["agreement"] == compared.metrics["agreement"] == 0.0
    assert entry["char_error_rate"] == 1.0 and entry["changed_examples"][0]["compressed"] == "(empty)"
    # Position by position, the blanks would have agreed on over a third of the frames.
    frames = models.run_onnx(original, data)["out"]
    assert float((frames.argmax(axis=-1) == 0).mean()) > 0.3


def test_ctc_blank_can_be_set(tmp_path: Path) -> None:
    data = models.features(tmp_path / "eval.npz", (6, 24, 6))
    original = models.ctc_recognizer(tmp_path / "crnn.onnx")
    values = models.run_onnx(original, data)["out"]
    inputs = [models_spec("x")]
    task, reason = tasks.detect(models_spec("out"), values, inputs, {"task.out": "ctc", "ctc_blank": 11})
    assert task == "ctc" and "blank 11" in reason
    # A speech recogniser's attention_mask does not make its frames an embedding.
    speech = [models_spec("input_values"), models_spec("attention_mask")]
    assert tasks.detect(models_spec("logits"), values, speech, {})[0] == "ctc"
    compared = models.measure_and_compare(original, original, data, options={"ctc_blank": 11})
    assert compared.original.output_info["out"]["params"]["blank"] == 11
    assert compared.metrics["outputs"]["out"]["exact_match"] == 1.0


def models_spec(name: str) -> Any:
    from compressor.models import TensorSpec

    return TensorSpec(name, (None,), "float32")


@pytest.mark.parametrize("per_frame", [False, True], ids=["N-K", "N-88-T"])
def test_independent_probabilities_are_compared_by_f1(tmp_path: Path, per_frame: bool) -> None:
    data = models.features(tmp_path / "eval.npz", (12, 20, 5) if per_frame else (40, 5))
    original = models.multi_label(tmp_path / "a.onnx", per_frame=per_frame)
    variant = models.multi_label(tmp_path / "b.onnx", shift=0.8, per_frame=per_frame)
    name = "notes" if per_frame else "labels"
    entry = models.measure_and_compare(original, variant, data).metrics["outputs"][name]
    assert entry["task"] == "multi-label" and entry["params"] == {"threshold": 0.5}
    before = models.run_onnx(original, data)[name] > 0.5
    after = models.run_onnx(variant, data)[name] > 0.5
    f1 = 2 * (before & after).sum() / (2 * (before & after).sum() + (before ^ after).sum())
    assert entry["f1"] == entry["agreement"] == pytest.approx(float(f1))
    assert entry["headline_metric"] == "f1" and 0.5 < entry["f1"] < 1.0
    assert entry["positives"] == {"original": int(before.sum()), "variant": int(after.sum())}


def test_one_probability_per_example_is_a_decision_never_a_cosine(tmp_path: Path) -> None:
    model = models.probability(tmp_path / "p.onnx")
    x = np.random.default_rng(12).normal(size=(60, 5)).astype(np.float32)
    probabilities = 1 / (1 + np.exp(-(x @ np.asarray(_weights(model)["w"]))))
    data = models.features(tmp_path / "eval.npz", (60, 5), seed=12, y=(probabilities[:, 0] > 0.5).astype(np.int64))
    out = tmp_path / "out"
    result = fp16_run(model, data, out)
    assert result.exit_code == 0, result.output
    variants = report_of(out)
    entry = variants["fp16"]["metrics"]["outputs"]["p"]
    assert entry["task"] == "probability" and entry["params"] == {"threshold": 0.5}
    assert "cosine" not in entry and "cosine" not in variants["fp16"]["metrics"]
    assert entry["headline_metric"] == "decision_agreement" and entry["agreement"] == 1.0
    assert 0 < entry["abs_error"]["max"] < 1e-2
    assert variants["original"]["metrics"]["accuracy"] == 1.0


def _weights(path: Path) -> dict[str, Any]:
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_nan_outputs_are_flagged_and_fail_min_agreement(tmp_path: Path) -> None:
    model = models.nan_when_quantized(tmp_path / "m.onnx")
    data = models.features(tmp_path / "eval.npz", (50, 5), seed=13)
    out = tmp_path / "out"
    result = run("run", model, "-q", "dynamic", "--set", "per_channel=false", "--data", data,
                 "--min-seconds", "0", "--min-agreement", "0.3", "-o", out)
    assert result.exit_code == 6, result.output
    variants = report_of(out)
    assert not np.isnan(models.run_onnx(out / "original.onnx", data)["probs"]).any()
    broken = models.run_onnx(out / "dynamic.onnx", data)["probs"]
    count = int(np.isnan(broken).any(axis=1).sum())
    assert 0 < count < 50
    quantized = variants["dynamic"]
    assert quantized["metrics"]["nonfinite"]["probs"] == {"examples": count, "share": count / 50,
                                                         "original_examples": 0, "new_examples": count}
    assert f"output probs holds NaN or Inf for {count} of 50 examples ({100 * count / 50:.1f}%)" \
        in " ".join(quantized["warnings"])
    # An example with NaN counts as changed: agreement is at most the finite share.
    assert quantized["metrics"]["agreement"] <= 1 - count / 50
    assert quantized["metrics"]["agreement"] >= 0.3  # so only the NaN fails the budget
    assert quantized["budget_failures"] == [f"output probs holds NaN or Inf for {count} examples where "
                                            "the original's does not"]
    assert variants["original"]["warnings"] == [] and variants["original"]["budget_failures"] == []
    assert "NaN/Inf" in result.output


def test_labels_are_scored_on_the_classifier_output_not_output_0(tmp_path: Path) -> None:
    model = models.face_crops(tmp_path / "onet.onnx")
    x = np.random.default_rng(14).normal(size=(40, 5)).astype(np.float32)
    faces = (x @ _weights(model)["wp"]).argmax(axis=1)
    data = models.features(tmp_path / "eval.npz", (40, 5), seed=14, y=faces)
    out = tmp_path / "out"
    result = fp16_run(model, data, out)
    assert result.exit_code == 0, result.output
    original, fp16 = report_of(out)["original"]["metrics"], report_of(out)["fp16"]["metrics"]
    outputs = fp16["outputs"]
    assert [outputs[name]["task"] for name in outputs] == ["regression", "regression", "classifier"]
    assert "beside 'output_2'" in outputs["output_0"]["reason"]
    assert original["compared_output"] == "output_2" and original["accuracy"] == 1.0
    assert "accuracy" not in outputs["output_0"] and "agreement" not in outputs["output_0"]
    assert outputs["output_2"]["accuracy"] == fp16["accuracy"]
    assert "output_2 100.00%" in result.output and "output_0 rel.err" in result.output


def test_label_output_is_declared_or_inferred() -> None:
    rng = np.random.default_rng(15)
    probabilities = rng.dirichlet(np.ones(3), size=20).astype(np.float32)
    values = {"boxes": rng.normal(size=(20, 4)).astype(np.float32), "classes": probabilities}
    assert tasks.label_output(values) == "classes"
    assert tasks.label_output({"a": "regression", "b": "probability", "c": "classifier"}) == "c"
    entries = {"small": {"task": "classifier", "shape": [3]}, "large": {"task": "classifier", "shape": [10]}}
    assert tasks.label_output(entries, labels=np.array([0, 9, 4])) == "large"
    assert tasks.label_output(entries, labels=np.array([0, 2, 1])) == "small"
    assert tasks.label_output({"a": "regression", "b": "probability"}, labels=np.array([0, 1])) == "b"
    assert tasks.label_output({"a": "regression"}) is None
    assert tasks.label_output(values, {"label_output": "boxes"}) == "boxes"
    with pytest.raises(UsageError, match="label_output=nope names no output"):
        tasks.label_output(values, {"label_output": "nope"})


def test_the_task_and_its_parameters_can_be_set(tmp_path: Path) -> None:
    data = models.features(tmp_path / "eval.npz", (6, 3, 12, 16))
    original = models.face_map(tmp_path / "pnet.onnx")
    compared = models.measure_and_compare(original, original, data, options={"task.reg": "map",
                                                                             "label_output": "prob"})
    info = compared.original.output_info
    assert info["reg"]["task"] == "map" and info["reg"]["reason"].startswith("set with --set task")
    assert info["prob"]["label_output"] is True
    with pytest.raises(UsageError, match="names no compared output"):
        models.measure_and_compare(original, original, data, options={"label_output": "nope"})
