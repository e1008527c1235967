"""Bad numbers, huge sweeps, odd names, broken plugins and malformed reports: each is
one line naming the problem, a documented exit code, nothing written, inputs unchanged."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import snapshot
from test_core_run import invoke
from test_plugins import run_cli, write_dist

USAGE, INVALID, UNSUPPORTED = 2, 4, 5


def refused(result: object, code: int, message: str, out: Path) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--max-accuracy-drop", "nan"], "not a finite number"),
    (["--min-agreement", "nan"], "not a finite number"),
    (["--min-seconds", "inf"], "not in the range"),
    (["--prune", "nan"], "not a finite number"),
    (["--prune", "0"], "0<x<1"),
    (["--threads", "10000"], "CPUs this process may use"),
    (["--repeats", "1000000"], "1<=x<=1000"),
    (["--set", "bits=nan"], ""),
])
def test_numbers_that_would_switch_a_check_off_are_refused(
    toy_host, toy_model, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "out"
    before = snapshot(toy_model["folder"])
    result = invoke("run", toy_model["model"], "-q", "dynamic", "-o", out, *args)
    assert result.exit_code == USAGE, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists() and snapshot(toy_model["folder"]) == before


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_float_parameter_that_is_not_finite_is_refused_by_the_declaration(
    toy_host, toy_model, tmp_path, value: str
) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[variants.p]\nsteps = ["prune sparsity={value}"]\n')
    out = tmp_path / "out"
    result = invoke("run", toy_model["model"], "--recipe", recipe, "-o", out)
    refused(result, USAGE, "is not a valid finite number", out)


def test_a_sweep_of_ten_billion_variants_is_counted_not_expanded(toy_host, toy_model, tmp_path) -> None:
    recipe = tmp_path / "huge.toml"
    values = ", ".join(str(i) for i in range(100))
    placeholders = " ".join(f"k{i}={{k{i}}}" for i in range(5))
    sweeps = ", ".join(f"k{i} = [{values}]" for i in range(5))
    recipe.write_text(f'[variants.v]\nsteps = ["quantize dynamic {placeholders}"]\nsweep = {{ {sweeps} }}\n')
    out = tmp_path / "out"
    started = time.monotonic()
    result = invoke("run", toy_model["model"], "--recipe", recipe, "-o", out)
    assert time.monotonic() - started < 10
    refused(result, USAGE, "makes 10,000,000,000 variants", out)


def test_max_variants_lifts_the_limit(toy_host, toy_model, tmp_path) -> None:
    recipe = tmp_path / "wide.toml"
    recipe.write_text('[variants.v]\nsteps = ["quantize dynamic bits={b}"]\nsweep = { b = [2, 3, 4] }\n')
    out = tmp_path / "out"
    refused(invoke("run", toy_model["model"], "--recipe", recipe, "--max-variants", "2", "-o", out),
            USAGE, "more than the limit of 2", out)
    result = invoke("run", toy_model["model"], "--recipe", recipe, "--max-variants", "3",
                    "--min-seconds", "0", "-o", out)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("recipe_text, message", [
    ('[variants."a\\n"]\nsteps = ["quantize fp16"]\n', "must be one file name"),
    ('[variants."a.b"]\nsteps = ["quantize fp16"]\n[variants.a_b]\nsteps = ["quantize dynamic"]\n',
     "would both be saved as a_b"),
    ("x = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
])
def test_recipe_names_and_nesting_are_checked_before_work(
    toy_host, toy_model, tmp_path: Path, recipe_text: str, message: str
) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(recipe_text)
    out = tmp_path / "out"
    refused(invoke("run", toy_model["model"], "--recipe", recipe, "-o", out), USAGE, message, out)


def test_nan_features_are_invalid_data(toy_host, toy_model, tmp_path: Path) -> None:
    x = np.ones((20, 16), dtype=np.float32)
    x[3, 2] = np.nan
    data = tmp_path / "nan.npz"
    np.savez(data, x=x)
    out = tmp_path / "out"
    refused(invoke("run", toy_model["model"], "-q", "fp16", "--data", data, "-o", out),
            INVALID, "array 'x' holds 1 NaN or infinite value(s)", out)


def test_max_examples_reads_only_what_it_evaluates(toy_host, toy_model, tmp_path: Path) -> None:
    """A 48 MB eval file measured on 100 examples: the measuring process does not read the rest."""
    rng = np.random.default_rng(0)
    big = tmp_path / "big.npz"
    x = rng.normal(size=(750_000, 16)).astype(np.float32)
    np.savez(big, x=x, y=np.zeros(len(x), dtype=np.int64))
    del x
    small = tmp_path / "small.npz"
    np.savez(small, x=rng.normal(size=(100, 16)).astype(np.float32), y=np.zeros(100, dtype=np.int64))
    peaks = []
    for data, extra in ((big, ["--max-examples", "100"]), (small, [])):
        out = tmp_path / f"out-{data.stem}"
        result = invoke("run", toy_model["model"], "-q", "fp16", "--data", data, "--min-seconds", "0",
                        "-o", out, *extra)
        assert result.exit_code == 0, result.output
        variants = json.loads((out / "report.json").read_text())["variants"]
        peaks.append(variants[0]["metrics"]["peak_rss_bytes"])
    assert peaks[0] < peaks[1] + 16_000_000, peaks


def test_read_npz_limit_reads_the_first_rows_of_compressed_members(tmp_path: Path) -> None:
    from compressor.builtin import read_npz
    from compressor.models import TensorSpec

    path = tmp_path / "c.npz"
    x = np.arange(3000, dtype=np.float32).reshape(1000, 3)
    np.savez_compressed(path, x=x, y=np.arange(1000) % 3)
    dataset = read_npz(path, (TensorSpec("x", (None, 3), "float32"),), limit=7)
    assert dataset.size == 7 and np.array_equal(dataset.features["x"], x[:7])
    assert list(dataset.labels) == [0, 1, 2, 0, 1, 2, 0]


def test_an_optional_input_missing_from_the_data_is_a_note(tmp_path: Path) -> None:
    from compressor.builtin import read_npz
    from compressor.models import TensorSpec

    path = tmp_path / "tokens.npz"
    np.savez(path, input_ids=np.ones((4, 8), dtype=np.int64), attention_mask=np.ones((4, 8), dtype=np.int64))
    specs = (TensorSpec("input_ids", (None, None), "int64"), TensorSpec("attention_mask", (None, None), "int64"),
             TensorSpec("token_type_ids", (None, None), "int64", optional=True))
    dataset = read_npz(path, specs)
    assert sorted(dataset.features) == ["attention_mask", "input_ids"]
    assert dataset.notes == ["tokens.npz has no 'token_type_ids'; the model's default is used for it"]
    required = (*specs[:2], TensorSpec("token_type_ids", (None, None), "int64"))
    with pytest.raises(Exception, match="model's inputs are"):
        read_npz(path, required)


def test_measure_points_at_the_real_file_of_a_dotted_variant(toy_host, toy_model, tmp_path) -> None:
    out = tmp_path / "out"
    assert invoke("run", toy_model["model"], "--prune", "0.5", "--min-seconds", "0", "-o", out).exit_code == 0
    result = invoke("measure", out / "prune0.5.toy")
    assert result.exit_code == INVALID
    assert "variant 'prune0.5'" in result.stderr and "prune0_5.toy" in result.stderr


@pytest.mark.parametrize("content, message", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (json.dumps({"report_version": 1, "model": "m", "backend": "b", "created": "c",
                 "variants": [{"name": "original", "steps": [], "metrics": {"size_bytes": "big"}}]}),
     "not a compressor report.json"),
])
def test_malformed_reports_given_to_compare_are_invalid_input(tmp_path: Path, content: str, message: str) -> None:
    report = tmp_path / "report.json"
    report.write_text(content)
    result = invoke("compare", report)
    assert result.exit_code == INVALID, result.output
    assert result.stderr.count("\n") == 1 and message in result.stderr


@pytest.mark.parametrize("source, warning", [
    ("from compressor import hookimpl\n@hookimpl\ndef compressor_backends():\n    return [1, 2]\n",
     "declared int objects instead of compressor.Backend"),
    ("import sys\nsys.exit(0)\n", "called sys.exit(0) while being imported"),
    ("from compressor import hookimpl\n@hookimpl\ndef compressor_identify(path):\n    raise ValueError('no')\n",
     "failed to identify"),
])
def test_a_broken_plugin_is_named_and_the_others_keep_working(tmp_path: Path, source: str, warning: str) -> None:
    from onnx_fixtures import tiny_onnx_with_external_data

    site = tmp_path / "site"
    write_dist(site, "broken", {"broken": "broken_module"}, {"broken_module": source})
    model = tiny_onnx_with_external_data(tmp_path / "model")
    result = run_cli("measure", model, "--min-seconds", "0", extra_path=site)
    assert result.returncode == 0, result.stderr
    assert "'broken'" in result.stderr and warning in result.stderr
    assert "original" in result.stdout


def test_a_set_that_a_step_already_sets_is_a_conflict_not_silently_ignored(toy_host, toy_model, tmp_path) -> None:
    out = tmp_path / "out"
    result = invoke("run", toy_model["model"], "--prune", "0.5", "--set", "sparsity=0.8", "-o", out)
    refused(result, USAGE, "--set sparsity=0.8 conflicts with 'prune 0.5'", out)
