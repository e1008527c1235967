"""``compressor compare``: merging reports across runs and backends, and its command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from report_fixtures import fasttext_report, onnx_report

from compressor.cli import CompressorGroup, cli
from compressor.errors import InvalidInputError, UsageError
from compressor.html_report import render_html
from compressor.merging import compare, load_report, merge_reports
from compressor.report import Report, rows

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: The real CLI group with ``compare`` added, until the lead registers it in compressor.cli.
group = CompressorGroup(name="compressor", commands={"compare": compare})


def write_run(folder: Path, report: Report) -> Path:
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(report.to_json())
    return folder


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    return (write_run(tmp_path / "runs" / "digits", onnx_report()),
            write_run(tmp_path / "runs" / "debian", fasttext_report()))


def by_name(report: Report) -> dict[str, list[str]]:
    return {row[0].rstrip(" !"): row for row in rows(report)}


# ---------------------------------------------------------------- merging


def test_merge_across_backends(two_runs: tuple[Path, Path]) -> None:
    onnx_folder, fasttext_folder = two_runs
    merged = merge_reports([onnx_folder, fasttext_folder / "report.json"])
    assert [v.name for v in merged.variants] == [
        "onnx:original", "onnx:fp16", "onnx:dynamic", "onnx:int8", "fasttext:original", "fasttext:pq",
    ]
    assert merged.backend == "onnx+fasttext"
    assert merged.model == "digits.onnx, debian.bin"
    table = by_name(merged)
    assert table["onnx:dynamic"][4] == "3.6x"
    assert table["fasttext:pq"][4] == "1.1x"  # relative to the first report's original
    assert merged.variants[3].budget_failures == ["accuracy drop 6.11 pt exceeds --max-accuracy-drop 1"]
    assert merged.variants[5].artifact == str(fasttext_folder / "pq.ftz")
    assert merged.variants[5].metadata["cutoff"] == 100000


def test_merge_keeps_each_runs_environment_and_settings(two_runs: tuple[Path, Path]) -> None:
    merged = merge_reports(list(two_runs))
    pq = merged.variants[-1].metadata["source"]
    assert pq["variant"] == "pq" and pq["backend"] == "fasttext" and pq["model"] == "debian.bin"
    assert pq["settings"]["threads"] == 2
    assert pq["environment"]["versions"]["fasttext-numpy2"] == "0.10.4"
    assert merged.variants[0].metadata["source"]["settings"]["threads"] == 1
    # Only what all runs agree on stays at the top.
    assert "threads" not in merged.settings and merged.settings["batch_size"] == 32
    assert merged.environment["versions"] == {"compressor": "0.1.0", "numpy": "2.1.3"}
    assert merged.environment["cpu"]["model"] == "AMD EPYC 7B13"


def test_same_backend_twice_uses_folder_names(tmp_path: Path) -> None:
    first = write_run(tmp_path / "int8-run", onnx_report())
    second = write_run(tmp_path / "fp16-run", onnx_report())
    merged = merge_reports([first, second])
    assert [v.name for v in merged.variants][:2] == ["int8-run:original", "int8-run:fp16"]
    assert merged.variants[4].name == "fp16-run:original"
    assert merged.backend == "onnx"

    third = write_run(tmp_path / "again" / "int8-run", onnx_report())
    names = [v.name for v in merge_reports([first, third]).variants]
    assert names[0] == "int8-run#1:original" and names[4] == "int8-run#2:original"
    assert len(set(names)) == len(names)


def test_one_report_is_returned_as_it_is(two_runs: tuple[Path, Path]) -> None:
    merged = merge_reports([two_runs[0]])
    assert [v.name for v in merged.variants] == ["original", "fp16", "dynamic", "int8"]
    assert merged.to_json() == onnx_report().to_json()


def test_merged_report_renders_sources_with_a_warning(two_runs: tuple[Path, Path]) -> None:
    document = render_html(merge_reports(list(two_runs)))
    assert "<h2>Sources</h2>" in document
    assert "different CPUs or thread counts" in document  # threads 1 vs 2
    assert "<h3>fasttext:pq</h3>" in document
    assert "vs onnx:original" in document and "vs fasttext:original" in document


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(("content", "message"), [
    ('{"report_version": 1, "variants": [', "not valid JSON"),
    ("[1, 2]", "not a compressor report.json (no variants)"),
    (json.dumps({**json.loads(onnx_report().to_json()), "report_version": 99}),
     "report_version 99 is not supported; this compressor reads version 1"),
    (json.dumps({**json.loads(onnx_report().to_json()), "variants": [{"steps": []}]}), "variant 0 has no name"),
    (json.dumps({**json.loads(onnx_report().to_json()), "variants": []}), "not a non-empty list"),
    (json.dumps({**json.loads(onnx_report().to_json()), "model": None}), "'model' is missing"),
    (json.dumps({**json.loads(onnx_report().to_json()), "extra": 1}), "unexpected keyword argument 'extra'"),
])
def test_bad_reports_are_refused_with_their_path(tmp_path: Path, content: str, message: str) -> None:
    bad = tmp_path / "report.json"
    bad.write_text(content)
    with pytest.raises(InvalidInputError) as caught:
        load_report(tmp_path)
    assert message in caught.value.message
    assert caught.value.path == bad


def test_missing_and_repeated_inputs(tmp_path: Path, two_runs: tuple[Path, Path]) -> None:
    with pytest.raises(InvalidInputError) as missing:
        merge_reports([two_runs[0], tmp_path / "nope"])
    assert missing.value.path == tmp_path / "nope" and "no such file" in missing.value.message
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="no report.json in this folder"):
        merge_reports([tmp_path / "empty"])
    with pytest.raises(UsageError, match="given twice"):
        merge_reports([two_runs[0], two_runs[0] / "report.json"])
    with pytest.raises(UsageError, match="at least one"):
        merge_reports([])


# ---------------------------------------------------------------- the command


def test_command_prints_table_and_writes_every_format(tmp_path: Path, two_runs: tuple[Path, Path]) -> None:
    out = tmp_path / "comparison"
    result = CliRunner().invoke(group, ["compare", *map(str, two_runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "onnx:dynamic" in result.output and "fasttext:pq" in result.output
    assert "wrote report.json, report.md, report.html, report.png" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md", "report.png"]
    assert len(load_report(out).variants) == 6
    assert "| fasttext:pq | pq |" in (out / "report.md").read_text()
    assert "<h3>onnx:int8</h3>" in (out / "report.html").read_text()
    assert (out / "report.png").read_bytes().startswith(PNG_SIGNATURE)


def test_command_refuses_a_used_out_folder(tmp_path: Path, two_runs: tuple[Path, Path]) -> None:
    out = tmp_path / "comparison"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused = CliRunner().invoke(group, ["compare", *map(str, two_runs), "--out", str(out)])
    assert refused.exit_code == 2
    assert "--force" in refused.output and "onnx:dynamic" not in refused.output
    forced = CliRunner().invoke(group, ["compare", *map(str, two_runs), "--out", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert (out / "keep.txt").read_text() == "mine" and (out / "report.html").exists()

    into_input = CliRunner().invoke(group, ["compare", *map(str, two_runs), "-o", str(two_runs[0]), "--force"])
    assert into_input.exit_code == 2
    assert "folder of the input report.json" in into_input.output
    assert sorted(p.name for p in two_runs[0].iterdir()) == ["report.json"]


def test_command_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, two_runs: tuple[Path, Path]) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"report_version": 1')
    out = tmp_path / "comparison"
    result = CliRunner().invoke(group, ["compare", str(two_runs[0]), str(broken), "--out", str(out)])
    assert result.exit_code == 4
    assert result.output.strip().splitlines() == [
        f"error: {broken}: not valid JSON: Expecting ',' delimiter (line 1, column 21)"
    ]
    assert not out.exists()


def test_real_runs_of_the_toy_backend_compared_in_a_subprocess(
    tmp_path: Path, toy_host: object, toy_model: dict[str, Path]
) -> None:
    runner = CliRunner()
    for name, flags in (("quantized", ["-q", "fp16", "-q", "dynamic"]), ("pruned", ["--prune", "0.5"])):
        result = runner.invoke(cli, ["run", str(toy_model["model"]), *flags, "--data", str(toy_model["eval"]),
                                     "--out", str(tmp_path / name), "--min-seconds", "0.01"])
        assert result.exit_code == 0, result.output
    script = ("from compressor.cli import CompressorGroup; from compressor.merging import compare; "
              "CompressorGroup(commands={'compare': compare})(prog_name='compressor')")
    completed = subprocess.run(
        [sys.executable, "-c", script, "compare", str(tmp_path / "quantized"), str(tmp_path / "pruned"),
         "--out", str(tmp_path / "both")],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    pruned = load_report(tmp_path / "pruned").variants[1].name
    merged = load_report(tmp_path / "both")
    names = [v.name for v in merged.variants]
    assert names == ["quantized:original", "quantized:fp16", "quantized:dynamic", "pruned:original",
                     f"pruned:{pruned}"]
    assert f"pruned:{pruned}" in completed.stdout
    assert all(v.metrics["accuracy"] > 0.5 for v in merged.variants)
    document = (tmp_path / "both" / "report.html").read_text()
    for name in names:
        assert name in document
    assert (tmp_path / "both" / "report.png").stat().st_size > 10_000


# ---------------------------------------------------------------- runs of different models


def test_runs_of_different_models_are_compared_with_a_warning(two_runs: tuple[Path, Path]) -> None:
    """digits.onnx against debian.bin: the ratios are against an unrelated model (reports
    from before the fingerprint: their file names tell)."""
    merged = merge_reports(list(two_runs))
    assert "the runs' originals are different model files (debian.bin, digits.onnx)" in merged.variants[0].notes[-1]
    result = CliRunner().invoke(group, ["compare", *map(str, two_runs)])
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("warning: the runs' originals are different model files (debian.bin, "
                                    'digits.onnx): "smaller" compares every variant with the first run\'s original')


def test_the_fingerprint_tells_two_models_of_one_name_apart(toy_host, tmp_path: Path) -> None:
    import compressor

    runs = []
    for seed in (1, 2):
        folder = tmp_path / f"project{seed}"
        folder.mkdir()
        weights = np.random.default_rng(seed).normal(size=(8, 3)).tolist()
        (folder / "model.toy").write_text(json.dumps({"weights": weights, "bias": [0.0] * 3}))
        runs.append(compressor.run(folder / "model.toy", "quantize fp16", out=tmp_path / f"out{seed}",
                                   min_seconds=0))
    model_file = runs[0].variants[0].metadata["model_file"]
    assert model_file["name"] == "model.toy" and model_file["inputs"] == [
        {"name": "x", "dtype": "float32", "shape": [None, 8]}]
    assert "originals are different models (model.toy: " in compressor.compare(*runs).variants[0].notes[-1]
    same = compressor.run(tmp_path / "project1" / "model.toy", "quantize dynamic", out=tmp_path / "again",
                          min_seconds=0)
    assert compressor.compare(runs[0], same).variants[0].notes == runs[0].variants[0].notes
