"""--backend a,b: the same variants on several backends, compared with one original."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import registered
from search_backend import write_dial

from compressor.cli import cli


@pytest.fixture
def two_backends() -> Iterator[object]:
    """The dial backend, and a second one reading the same files (as onnx and tflite
    both read a PyTorch model): its runtime answers in float16."""
    with registered("search_backend", "dial"), registered("second_dial", "dial2") as host:
        yield host



def test_one_comparison_against_one_original(two_backends, tmp_path: Path) -> None:
    files = write_dial(tmp_path / "in")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(files["model"]), "--backend", "dial,dial2", "-q", "int8",
                                      "--data", str(files["data"]), "--min-seconds", "0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "dial" / "report.json").is_file() and (out / "dial2" / "int8.dial").is_file()
    merged = json.loads((out / "report.json").read_text())
    names = [v["name"] for v in merged["variants"]]
    assert names == ["dial:original", "dial:int8", "dial2:original", "dial2:int8"]
    assert merged["settings"]["reference"] == "dial:original"
    second = merged["variants"][2]["metrics"]
    assert second["reference"] == "dial:original" and second["vs_own_original"]["agreement"] == 1.0
    assert second["cosine"]["mean"] < 1.0  # float16 answers differ from the reference's float32 ones


def test_an_unknown_backend_in_the_list_is_refused_before_work(two_backends, tmp_path: Path) -> None:
    files = write_dial(tmp_path / "in")
    result = CliRunner().invoke(cli, ["run", str(files["model"]), "--backend", "dial,nope", "-q", "int8",
                                      "-o", str(tmp_path / "out")])
    assert result.exit_code == 5 and "unknown backend 'nope'" in result.stderr
    assert not (tmp_path / "out").exists()
