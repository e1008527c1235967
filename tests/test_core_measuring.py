"""Core measures a backend's Runtime: every output kept and compared by its task,
scalar and stateful inputs, batch-1 fidelity, memory at each batch, data errors as exit 4."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from test_core_run import invoke


def write_model(folder: Path, **flags: Any) -> dict[str, Path]:
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    w = rng.normal(size=(8, 6))
    heads = {"logits": rng.normal(size=(6, 5)), "boxes": rng.normal(size=(6, 4))}
    model = folder / "model.heads"
    model.write_text(json.dumps({"w": w.tolist(), "heads": {k: v.tolist() for k, v in heads.items()},
                                 **flags}))
    x = rng.normal(size=(120, 8)).astype(np.float32)
    arrays: dict[str, Any] = {"x": x, "y": (x @ w @ heads["logits"]).argmax(1)}
    if flags.get("scalar"):
        arrays["sr"] = np.array(16000, dtype=np.int64)
    if flags.get("state"):
        arrays["state"] = np.zeros((1, 120, 6), dtype=np.float32)
    data = folder / "eval.npz"
    np.savez(data, **arrays)
    return {"model": model, "data": data}


def run(files: dict[str, Path], out: Path, *args: str) -> dict[str, Any]:
    result = invoke("run", files["model"], "-q", "fp16", "-q", "dynamic", "--data", files["data"],
                    "--min-seconds", "0", "-o", out, *args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text())


def test_every_output_is_compared_by_what_it_is(heads_host, tmp_path: Path) -> None:
    report = run(write_model(tmp_path / "m"), tmp_path / "out")
    original, fp16, dynamic = (variant["metrics"] for variant in report["variants"])
    assert original["outputs"]["logits"]["task"] == "classifier"
    assert original["outputs"]["boxes"]["task"] == "regression"
    assert "coordinates" in original["outputs"]["boxes"]["reason"]
    assert original["agreement"] == 1.0 and original["accuracy"] == 1.0
    assert original["compared_output"] == "logits"
    # The 4-column box head is compared as numbers, never as a 4-class classifier.
    boxes = dynamic["outputs"]["boxes"]
    assert "agreement" not in boxes and boxes["relative_error"]["mean"] > 0
    assert fp16["outputs"]["boxes"]["relative_error"]["mean"] < boxes["relative_error"]["mean"]
    assert dynamic["agreement"] < 1.0 and set(dynamic["outputs"]) == {"logits", "boxes"}
    assert original["eval_batch"] == 1
    assert original["peak_rss_bytes"] <= original["peak_rss_batch_bytes"]
    assert original["runtime"] == "numpy" and original["load_ms"] >= 0


def test_outputs_and_task_can_be_chosen(heads_host, tmp_path: Path) -> None:
    files = write_model(tmp_path / "m")
    report = run(files, tmp_path / "a", "--set", "outputs=boxes", "--set", "task.boxes=detection")
    metrics = report["variants"][2]["metrics"]
    assert list(metrics["outputs"]) == ["boxes"] and metrics["task"] == "detection"
    assert metrics["compared_output"] == "boxes" and 0 < metrics["iou"]["mean"] < 1
    assert report["variants"][0]["metrics"]["iou"]["mean"] == 1.0


def test_a_scalar_input_is_given_to_every_call(heads_host, tmp_path: Path) -> None:
    report = run(write_model(tmp_path / "m", scalar=True), tmp_path / "out")
    assert report["variants"][0]["metrics"]["accuracy"] == 1.0


def test_a_stateful_model_runs_example_by_example_with_its_state_carried(heads_host, tmp_path) -> None:
    files = write_model(tmp_path / "m", state=True)
    carried = run(files, tmp_path / "a", "--set", "batch_axis.state=1", "--set", "state.state_out=state")
    fresh = run(files, tmp_path / "b", "--set", "batch_axis.state=1")
    assert "state_out" not in carried["variants"][0]["metrics"]["outputs"]
    # With the state carried, later examples see earlier ones: labels computed without state differ.
    assert carried["variants"][0]["metrics"]["accuracy"] < 1.0
    assert fresh["variants"][0]["metrics"]["accuracy"] == 1.0
    assert carried["variants"][0]["metrics"]["eval_batch"] == 1
    assert "latency_batch_ms" not in carried["variants"][0]["metrics"]


def test_inputs_with_different_counts_name_the_batch_axis_option(heads_host, tmp_path: Path) -> None:
    files = write_model(tmp_path / "m", state=True)
    out = tmp_path / "out"
    result = invoke("run", files["model"], "-q", "fp16", "--data", files["data"], "-o", out)
    assert result.exit_code == 4 and "batch_axis" in result.stderr
    assert result.stderr.count("\n") == 1 and not out.exists()


def test_a_runtime_that_refuses_the_data_is_a_data_error(heads_host, tmp_path: Path) -> None:
    files = write_model(tmp_path / "m", max_abs=1e3)
    np.savez(files["data"], x=np.full((10, 8), 5e3, dtype=np.float32))
    out = tmp_path / "out"
    result = invoke("run", files["model"], "-q", "fp16", "--data", files["data"], "-o", out)
    assert result.exit_code == 4, result.output
    assert "the runtime refused the inputs (x [1, 8]): values beyond 1000 overflow" in result.stderr
    assert str(files["data"]) in result.stderr and not out.exists()


def test_unknown_outputs_and_tasks_are_usage_errors(heads_host, tmp_path: Path) -> None:
    files = write_model(tmp_path / "m")
    for setting, message in (("outputs=nope", "the model's outputs are logits, boxes"),
                             ("task=banana", "not one of")):
        out = tmp_path / setting.split("=")[0]
        result = invoke("run", files["model"], "-q", "fp16", "--data", files["data"], "--set", setting,
                        "-o", out)
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert not out.exists()


class _Doubling:
    """A runtime of this test's own: ``y = 2 x``; ``bug`` makes its own code fail."""

    def __init__(self, bug: bool) -> None:
        from compressor import Runtime, TensorSpec

        class Doubling(Runtime):
            inputs = (TensorSpec("x", (None, 3), "float32"),)
            outputs = (TensorSpec("y", (None, 3), "float32"),)

            def run(self, feeds: Any) -> dict[str, Any]:
                if bug:
                    return {"y": feeds["x"].doubled()}  # AttributeError: a bug in the plugin
                return {"y": feeds["x"] @ np.eye(4) * 2}  # numpy refuses: 3 columns against 4 rows

        self.runtime = Doubling()


def test_a_bug_in_a_runtime_is_told_apart_from_a_refusal_of_the_data(tmp_path: Path) -> None:
    """A Python error raised in the plugin's own code is a bug (exit 1), anything else its
    framework raises is a refusal of the data (exit 4); both keep their cause."""
    import pytest

    from compressor import CompressorError, Dataset, InvalidInputError, MeasureSettings
    from compressor.engine import measure_runtime

    data = Dataset(tmp_path / "eval.npz", {"x": np.ones((4, 3), np.float32)}, None, 4)
    settings = MeasureSettings(warmup=1, min_iterations=1, min_seconds=0.0)
    with pytest.raises(CompressorError, match=r"Doubling\.run raised AttributeError: .*doubled.*a bug in the "
                                              r"plugin") as bug:
        measure_runtime(_Doubling(bug=True).runtime, data, settings)
    assert type(bug.value) is CompressorError and bug.value.exit_code == 1
    assert isinstance(bug.value.__cause__, AttributeError)
    with pytest.raises(InvalidInputError, match=r"the runtime refused the inputs \(x \[1, 3\]\)") as refused:
        measure_runtime(_Doubling(bug=False).runtime, data, settings)
    assert refused.value.path == tmp_path / "eval.npz" and isinstance(refused.value.__cause__, ValueError)
