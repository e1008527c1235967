"""The fasttext backend through the CLI, in-process and as a real subprocess."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import snapshot
from fasttext_fixtures import FastTextFiles

from compressor.cli import cli
from compressor_fasttext.header import MAGIC

#: The session fixture ``ft`` (small trained models) lives in fasttext_fixtures.
pytest_plugins = ("fasttext_fixtures",)
QUICK = ("--min-seconds", "0")


def run_cli(*args: str) -> object:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_pq_with_retrain_end_to_end(ft: FastTextFiles, tmp_path: Path) -> None:
    before = snapshot(ft.folder)
    out = tmp_path / "out"
    result = run_cli(
        "run", str(ft.model), "--pq", "--set", "cutoff=1000", "--set", "retrain=true",
        "--set", "qnorm=true", "--set", "k=2", "--set", "epoch=2", "--train-data", str(ft.train),
        "--data", str(ft.test), "--out", str(out), *QUICK,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    original, pq = report["variants"]
    assert (original["artifact"], pq["artifact"]) == ("original.bin", "pq.ftz")
    assert pq["metrics"]["size_bytes"] * 5 < original["metrics"]["size_bytes"]
    for variant in (original, pq):
        metrics = variant["metrics"]
        assert 0.5 < metrics["accuracy"] <= 1 and metrics["k"] == 2
        assert metrics["recall_at_k"] >= metrics["accuracy"]
        assert set(metrics["per_label_f1"]) == {f"__label__{t}" for t in
                                               ("games", "sound", "science", "network", "graphics", "database")}
        assert metrics["latency_ms"]["p50"] > 0 and metrics["peak_rss_bytes"] > 0
    assert original["metrics"]["agreement"] == 1.0
    assert pq["metrics"]["compress_seconds"] > 0
    assert pq["metadata"]["eval_predictions_changed"] == pq["metrics"]["changed_count"]
    assert "labels_changed_most" in pq["metadata"]
    assert "pq" in (out / "report.md").read_text()
    assert snapshot(ft.folder) == before


def test_retrain_without_training_data_is_refused_before_any_work(ft: FastTextFiles, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("run", str(ft.model), "--pq", "--set", "retrain=true", "--set", "cutoff=1000",
                     "--out", str(out))
    assert result.exit_code == 2
    assert "--train-data" in result.output
    assert not out.exists()


def bad_file(kind: str, ft: FastTextFiles, folder: Path) -> Path:
    data = ft.model.read_bytes()
    path = folder / f"{kind}.bin"
    path.write_bytes({
        "empty": b"",
        "truncated-half": data[: len(data) // 2],
        "random": os.urandom(4096),
        "random-after-header": struct.pack("<ii", MAGIC, 12) + os.urandom(4096),
    }[kind])
    return path


@pytest.mark.parametrize("kind", ["empty", "truncated-half", "random", "random-after-header"])
def test_bad_model_files_are_a_one_line_error(ft: FastTextFiles, tmp_path: Path, kind: str) -> None:
    path = bad_file(kind, ft, tmp_path)
    out = tmp_path / "out"
    result = run_cli("run", str(path), "--pq", "--out", str(out))
    assert result.exit_code == 4, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: not a valid fastText model")
    assert not out.exists()


def test_pq_on_a_word_vector_model_is_unsupported(ft: FastTextFiles, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("run", str(ft.vectors), "--pq", "--out", str(out))
    assert result.exit_code == 5
    assert "supervised classifier" in result.output
    assert not out.exists()


def test_a_too_small_model_fails_its_variant(ft: FastTextFiles, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("run", str(ft.tiny), "--pq", "--out", str(out), *QUICK)
    assert result.exit_code == 7
    report = json.loads((out / "report.json").read_text())
    assert "at least 256 input rows" in report["variants"][1]["error"]


def test_quantize_and_prune_are_not_fasttext_techniques(ft: FastTextFiles, tmp_path: Path) -> None:
    for flags in (["-q", "int8"], ["--prune", "0.5"]):
        result = run_cli("run", str(ft.model), *flags, "--out", str(tmp_path / "out"))
        assert result.exit_code == 5
        assert "it supports: pq" in result.output


def test_measure_a_quantized_model(ft: FastTextFiles) -> None:
    result = run_cli("measure", str(ft.quantized), "--data", str(ft.test), *QUICK)
    assert result.exit_code == 0, result.output
    assert "original" in result.output and "%" in result.output


def test_backends_lists_fasttext(ft: FastTextFiles) -> None:
    result = run_cli("backends")
    assert result.exit_code == 0
    assert "fasttext" in result.output


def test_recipe_as_a_real_subprocess(ft: FastTextFiles, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        '[variants.plain]\nsteps = ["pq dsub=4"]\n\n'
        '[variants.pruned]\nsteps = [{ technique = "pq", cutoff = 500, retrain = true, epoch = 1 }]\n'
    )
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "compressor", "run", str(ft.model), "--recipe", str(recipe),
         "--train-data", str(ft.train), "--data", str(ft.test), "--out", str(out), *QUICK],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    names = [variant["name"] for variant in report["variants"]]
    assert names == ["original", "plain", "pruned"]
    sizes = [variant["metrics"]["size_bytes"] for variant in report["variants"]]
    assert sizes[0] > sizes[1] > sizes[2]
    assert report["environment"]["versions"].get("fasttext-numpy2")


def test_demo_runs_the_sample_model(tmp_path: Path) -> None:
    result = run_cli("demo", "--backend", "fasttext", "--out", str(tmp_path / "demo"))
    assert result.exit_code == 0, result.output
    assert "pq cutoff=1000 retrain=true qnorm=true" in result.output
    assert (tmp_path / "demo" / "runs" / "fasttext-topics" / "pq-cutoff1000-retrain-qnorm.ftz").exists()


def check_refused(ft: FastTextFiles, tmp_path: Path, code: int, message: str, *args: str) -> str:
    """One line naming the key or file, the exit code, nothing written, inputs unchanged."""
    before = snapshot(ft.folder)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(ft.model), "--out", str(out), *args])
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "__label__" not in result.output and len(result.output) < 400
    assert not out.exists() and snapshot(ft.folder) == before
    return lines[0]


RETRAIN = ("--set", "cutoff=1000", "--set", "retrain=true")


@pytest.mark.parametrize(
    ("setting", "extra"),
    [
        # fastText aborted the process (SIGABRT) starting this many threads.
        ("thread=1000000", RETRAIN),
        # These overflowed fastText's 32-bit arguments: an internal error (exit 1),
        # k's carrying the whole eval text in its message.
        ("thread=100000000000", RETRAIN),
        ("dsub=100000000000", ()),
        ("cutoff=100000000000", ()),
        ("epoch=100000000000", RETRAIN),
        ("k=100000000000", ()),
        ("lr=1e30", RETRAIN),
    ],
)
def test_parameters_fasttext_cannot_take_are_usage_errors(
    ft: FastTextFiles, tmp_path: Path, setting: str, extra: tuple[str, ...]
) -> None:
    key = setting.split("=")[0]
    check_refused(ft, tmp_path, 2, f"{key}=", "--pq", "--set", setting, *extra,
                  "--train-data", str(ft.train), "--data", str(ft.test))


def test_dsub_larger_than_the_model_is_a_usage_error(ft: FastTextFiles, tmp_path: Path) -> None:
    check_refused(ft, tmp_path, 2, "dsub=17 is larger than the model's dim 16", "--pq", "--set", "dsub=17")


def test_a_50_mb_line_of_eval_text_is_invalid(ft: FastTextFiles, tmp_path: Path) -> None:
    huge = ft.folder / "one-line.txt"
    huge.write_bytes(b"__label__games " + b"w1 " * ((50 << 20) // 3))
    try:
        line = check_refused(ft, tmp_path, 4, "line 1 is longer than", "--pq", "--data", str(huge), *QUICK)
    finally:
        huge.unlink()
    assert str(huge) in line


def test_max_examples_reads_only_what_it_evaluates(ft: FastTextFiles, tmp_path: Path) -> None:
    """A 200 MB eval file with --max-examples 100 costs the measuring process no more
    memory than a small one: neither process reads past the 100th example."""
    big = tmp_path / "big.txt"
    line = ft.test.read_bytes().splitlines(keepends=True)[0]
    with big.open("wb") as stream:
        stream.write(ft.test.read_bytes())
        stream.write(line * ((200 << 20) // len(line)))
    peaks = {}
    for name, data in (("small", ft.test), ("big", big)):
        out = tmp_path / name
        result = run_cli("measure", str(ft.model), "--data", str(data), "--max-examples", "100",
                         "--out", str(out), *QUICK)
        assert result.exit_code == 0, result.output
        original = json.loads((out / "report.json").read_text())["variants"][0]["metrics"]
        assert original["examples_evaluated"] == 100
        peaks[name] = original["peak_rss_bytes"]
    assert peaks["big"] - peaks["small"] < 50 << 20, peaks
