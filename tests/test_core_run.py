"""compressor run / measure / demo end to end on the pure-Python toy backend."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import snapshot

from compressor.cli import cli

STABLE_KEYS = {"size_bytes", "size_gzip_bytes", "load_ms", "latency_ms", "peak_rss_bytes",
               "accuracy", "agreement"}


def invoke(*args: object) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_run_writes_artifacts_and_a_report_with_the_stable_keys(toy_host, toy_model, tmp_path) -> None:
    out = tmp_path / "out"
    before = snapshot(toy_model["folder"])
    result = invoke("run", toy_model["model"], "-q", "fp16", "-q", "dynamic", "--prune", "0.5",
                    "--data", toy_model["eval"], "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    names = [v["name"] for v in report["variants"]]
    assert names == ["original", "prune0.5-fp16", "prune0.5-dynamic"]
    for variant in report["variants"]:
        assert set(variant["metrics"]) >= STABLE_KEYS, variant["name"]
        assert set(variant["metrics"]["latency_ms"]) >= {"p50", "p90", "p99"}
        assert (out / variant["artifact"]).is_file()
        # peak RSS comes from the OS for a whole Python process: tens of MB, not Python's heap
        assert variant["metrics"]["peak_rss_bytes"] > 10_000_000
    original, pruned = report["variants"][0]["metrics"], report["variants"][1]["metrics"]
    assert original["accuracy"] == 1.0 and original["agreement"] == 1.0
    assert pruned["agreement"] < 1.0 and pruned["changed_examples"]
    assert pruned["changed_count"] == round((1 - pruned["agreement"]) * 200)
    assert pruned["size_bytes"] < original["size_bytes"]
    assert report["variants"][1]["notes"] == ["pruned one-shot (no training data)"]
    assert "prune0.5-fp16" in result.output and "| original |" in (out / "report.md").read_text()
    assert snapshot(toy_model["folder"]) == before


def test_without_techniques_run_uses_the_backend_defaults(toy_host, toy_model, tmp_path) -> None:
    result = invoke("run", toy_model["model"], "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [v["name"] for v in report["variants"]] == ["original", "fp16", "dynamic"]
    assert "accuracy" not in report["variants"][0]["metrics"]


def test_recipe_sweep_and_set_reach_the_steps(toy_host, toy_model, tmp_path) -> None:
    recipe = tmp_path / "study.toml"
    recipe.write_text('[variants.sparse]\nsteps = ["prune {s}", "quantize dynamic"]\n'
                      'sweep = { s = [0.2, 0.9] }\n')
    result = invoke("run", toy_model["model"], "--recipe", recipe, "--set", "bits=4",
                    "--data", toy_model["eval"], "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    variants = json.loads((tmp_path / "out" / "report.json").read_text())["variants"]
    assert [v["steps"] for v in variants[1:]] == [
        ["prune 0.2", "quantize dynamic bits=4"], ["prune 0.9", "quantize dynamic bits=4"]]
    assert variants[2]["metrics"]["accuracy"] < variants[1]["metrics"]["accuracy"]


def test_repeats_interleave_and_report_the_spread(toy_host, toy_model, tmp_path) -> None:
    result = invoke("run", toy_model["model"], "-q", "fp16", "--repeats", "3", "--min-seconds", "0.05",
                    "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["repeats"] == 3
    assert all("latency_p50_cv" in v["metrics"] for v in report["variants"])


def test_budget_failure_exits_6_and_marks_the_variant(toy_host, toy_model, tmp_path) -> None:
    out = tmp_path / "out"
    result = invoke("run", toy_model["model"], "--prune", "0.9", "-q", "fp16", "--data", toy_model["eval"],
                    "--max-accuracy-drop", "1", "--min-agreement", "0.99", "-o", out)
    assert result.exit_code == 6
    variant = json.loads((out / "report.json").read_text())["variants"][1]
    assert any("accuracy drop" in f for f in variant["budget_failures"])
    assert any("agreement" in f for f in variant["budget_failures"])
    assert "prune0.9-fp16 !" in result.output
    assert "! prune0.9-fp16: accuracy drop" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-q", "int4"], 5, "supports: fp16, dynamic, int8"),
        (["--pq"], 5, "supports: quantize, prune"),
        (["-q", "int8"], 2, "needs --calibration-data"),
        (["-q", "fp16", "--set", "colour=red"], 2, "bits, ctc_blank, eval_batch, label_output, objectness, outputs, scale"),
        (["-q", "fp16", "--set", "bits=eight"], 2, "not a valid int"),
        (["-q", "fp16", "--backend", "nope"], 5, "available:"),
    ],
)
def test_unsupported_requests_fail_before_any_work(toy_host, toy_model, tmp_path, args, code, message) -> None:
    out = tmp_path / "out"
    result = invoke("run", toy_model["model"], *args, "-o", out)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert not out.exists()


def test_corrupt_model_and_data_leave_nothing_behind(toy_host, toy_model, tmp_path) -> None:
    broken = toy_model["folder"] / "broken.toy"
    broken.write_text("{not json")
    out = tmp_path / "out"
    result = invoke("run", broken, "-q", "fp16", "-o", out)
    assert result.exit_code == 4 and f"error: {broken}: not a toy model" in result.output
    bad_data = toy_model["folder"] / "bad.npz"
    import numpy as np

    np.savez(bad_data, x=np.zeros((3, 5), np.float32))
    result = invoke("run", toy_model["model"], "-q", "fp16", "--data", bad_data, "-o", out)
    assert result.exit_code == 4 and "shape (3, 5)" in result.output
    result = invoke("run", tmp_path / "missing.toy", "-o", out)
    assert result.exit_code == 4 and "no such file" in result.output
    assert not out.exists()


def test_output_must_not_overlap_the_input_or_hold_files(toy_host, toy_model, tmp_path) -> None:
    folder = toy_model["folder"]
    before = snapshot(folder)
    assert invoke("run", toy_model["model"], "-q", "fp16", "-o", folder).exit_code == 2
    assert invoke("run", toy_model["model"], "-q", "fp16", "-o", toy_model["model"]).exit_code == 2
    assert snapshot(folder) == before
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("run", toy_model["model"], "-q", "fp16", "-o", out)
    assert result.exit_code == 2 and "--force" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert invoke("run", toy_model["model"], "-q", "fp16", "-o", out, "--force").exit_code == 0
    assert (out / "keep.txt").read_text() == "mine" and (out / "fp16.toy").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_measure_reports_the_model_as_it_is(toy_host, toy_model) -> None:
    result = invoke("measure", toy_model["model"], "--data", toy_model["eval"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[2].startswith("original")
    assert "100.00%" in result.output


def test_demo_runs_every_sample_of_the_chosen_backend(toy_host, tmp_path) -> None:
    result = invoke("demo", "--backend", "toy", "--out", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    assert "== toy: 8x3 linear classifier" in result.output
    assert (tmp_path / "demo" / "runs" / "toy-linear" / "report.json").exists()


def test_backends_and_plugins_describe_what_is_installed(toy_host) -> None:
    result = invoke("backends", "--json")
    toy = next(b for b in json.loads(result.output) if b["name"] == "toy")
    assert toy["installed"] and toy["techniques"]["quantize"]["modes"] == ["fp16", "dynamic", "int8"]
    plugins = json.loads(invoke("plugins", "--json").output)
    toy_plugin = next(p for p in plugins if p["name"] == "toy")
    assert "compressor_compress" in toy_plugin["hooks"]


def test_peak_ram_is_the_measuring_process_own(toy_host, toy_model, tmp_path) -> None:
    """A large parent must not leak into the child's figure (ru_maxrss would)."""
    ballast = b"x" * 400_000_000
    result = invoke("run", toy_model["model"], "-q", "fp16", "-o", tmp_path / "out")
    assert result.exit_code == 0 and len(ballast) == 400_000_000
    variants = json.loads((tmp_path / "out" / "report.json").read_text())["variants"]
    for variant in variants:
        assert 10_000_000 < variant["metrics"]["peak_rss_bytes"] < 300_000_000
        assert variant["metrics"]["baseline_rss_bytes"] <= variant["metrics"]["peak_rss_bytes"]


def test_run_help_lists_the_quantize_modes_the_backends_declare(toy_host, dial_host) -> None:
    """Not a fixed list: dial declares int4, which toy does not (and int16x8 exists on tflite)."""
    import re

    text = " ".join(invoke("run", "--help").output.split())
    modes = re.search(r"-q, --quantize MODE (.*?); repeat for one variant per mode", text)
    assert modes is not None, text
    assert re.search(r"int4 \([^)]*\bdial\b[^)]*\)", modes.group(1)), modes.group(1)
    assert "fp16" in modes.group(1) and "or uint8" not in text


def test_demo_of_a_backend_without_a_sample_says_so_and_what_to_run(toy_host, dial_host) -> None:
    """``compressor demo --backend torch`` said "no installed backend has a sample model; install
    compressor[onnx]" with onnx installed. dial, like torch, has no sample model."""
    alone = invoke("demo", "--backend", "dial")
    assert alone.exit_code == 5
    message = alone.stderr.strip()
    assert message.startswith("error: the dial backend has no demo sample model; try compressor demo --backend ")
    assert "toy" in message and "compressor run MODEL --backend dial" in message and "install" not in message
    both = invoke("demo", "--backend", "toy", "--backend", "dial")
    assert both.exit_code == 0, both.output  # toy's sample runs; dial's absence is said in its place
    assert "(dial skipped: it has no demo sample model; run yours: compressor run MODEL --backend dial" in both.output
