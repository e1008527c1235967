"""A backend whose framework is an impostor or fails to import is "installed but broken":
`backends` says why, `demo` skips it and runs the others, `run` refuses it in one line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from test_plugins import run_cli


def impostor_fasttext(site: Path) -> Path:
    """What `pip install fasttext-predict` does: a different module under the name `fasttext`."""
    package = site / "fasttext"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent("""
        def load_model(path):
            raise RuntimeError("fasttext-predict can only predict")
    """))
    info = site / "fasttext_predict-0.9.2.4.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fasttext-predict\nVersion: 0.9.2.4\n")
    (info / "top_level.txt").write_text("fasttext\n")
    (info / "RECORD").write_text("fasttext/__init__.py,,\nfasttext_predict-0.9.2.4.dist-info/METADATA,,\n")
    return site


def test_backends_names_the_impostor_without_importing_it(tmp_path: Path) -> None:
    site = impostor_fasttext(tmp_path / "site")
    result = run_cli("backends", extra_path=site)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("fasttext:"))
    assert "installed but broken: the module 'fasttext' comes from fasttext-predict" in line
    assert "onnx: " in result.stdout and "[installed]" in result.stdout


def test_run_refuses_a_broken_backend_in_one_line(tmp_path: Path) -> None:
    site = impostor_fasttext(tmp_path / "site")
    model = tmp_path / "model.bin"
    model.write_bytes(b"\x00" * 64)
    result = run_cli("run", model, "--pq", "-o", tmp_path / "out", extra_path=site)
    assert result.returncode == 5, result.stderr
    assert result.stderr.count("\n") == 1 and "installed but broken" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_demo_skips_the_broken_backend_and_runs_the_others(tmp_path: Path) -> None:
    site = impostor_fasttext(tmp_path / "site")
    result = run_cli("demo", "--backend", "fasttext", "--backend", "onnx", extra_path=site)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "== onnx:" in result.stdout and "== fasttext" not in result.stdout
    assert "(fasttext skipped: installed but broken: the module 'fasttext' comes from fasttext-predict" \
        in result.stdout
