"""Child processes (the measuring worker, the fastText probe) never import from
the folder the user runs compressor in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fasttext_fixtures import FastTextFiles, ft  # noqa: F401 - ft is a fixture
from onnx_fixtures import make_digits_files

from compressor.children import child_environment, import_path, python_command

#: Modules every child imports early; a planted copy of any of them must never run.
PLANTED = ("json", "numpy", "onnxruntime", "fasttext", "compressor", "tempfile")


def plant(folder: Path) -> Path:
    """Files named like common modules that leave a marker when imported."""
    marker = folder / "PLANTED-CODE-RAN"
    for name in PLANTED:
        (folder / f"{name}.py").write_text(
            f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\nraise SystemExit(99)\n"
        )
    return marker


def compressor_command() -> list[str]:
    """The installed console script, as users run it (not ``python -m``, which
    would put the working directory on the parent's own path)."""
    script = Path(sys.executable).with_name("compressor")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-P", "-c", "from compressor.cli import main; main()"]


def run_in(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(
        [*compressor_command(), *args], cwd=folder, capture_output=True, text=True,
        timeout=600, env=environment,
    )


def test_the_measuring_child_ignores_modules_in_the_working_directory(tmp_path: Path) -> None:
    digits = make_digits_files(tmp_path / "model")
    workdir = tmp_path / "work"
    workdir.mkdir()
    marker = plant(workdir)
    result = run_in(workdir, "run", str(digits.onnx), "-q", "dynamic", "--data", str(digits.eval),
                    "--min-seconds", "0", "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert not marker.exists(), marker.read_text()
    assert (tmp_path / "out" / "dynamic.onnx").exists()


def test_the_fasttext_probe_ignores_modules_in_the_working_directory(
    tmp_path: Path, ft: FastTextFiles  # noqa: F811
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    marker = plant(workdir)
    result = run_in(workdir, "measure", str(ft.model), "--data", str(ft.test), "--min-seconds", "0")
    assert result.returncode == 0, result.stderr
    assert not marker.exists(), marker.read_text()


def test_the_child_command_drops_the_working_directory(tmp_path: Path) -> None:
    marker = plant(tmp_path)
    probe = tmp_path / "probe_module.py"
    probe.write_text("import sys\ndef main(argv):\n    print(repr(sys.path))\n    return 0\n")
    environment = child_environment()
    environment["PYTHONPATH"] = os.pathsep.join([environment["PYTHONPATH"], str(tmp_path / "elsewhere")])
    # The probe module itself sits elsewhere, reachable only through PYTHONPATH.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe.rename(elsewhere / probe.name)
    result = subprocess.run(python_command("probe_module"), cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env=environment)
    assert result.returncode == 0, result.stderr
    assert not marker.exists()
    assert "''" not in result.stdout.split("[", 1)[1].split(",")[0]


@pytest.mark.parametrize("entry", ["", "."])
def test_import_path_leaves_out_the_working_directory(tmp_path: Path, entry: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", f"{entry}{os.pathsep}/somewhere/else")
    monkeypatch.setattr(sys, "path", [entry, str(tmp_path), "/somewhere/else"])
    assert import_path() == "/somewhere/else"


def test_import_path_keeps_the_working_directory_the_user_names(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``PYTHONPATH=$PWD compressor run model.pt --backend torch --set model_factory=mine:build``:
    the measuring child rebuilds the model, so it must import ``mine`` from there too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(sys, "path", ["", str(tmp_path), "/somewhere/else"])
    assert import_path() == f"{tmp_path}{os.pathsep}/somewhere/else"
