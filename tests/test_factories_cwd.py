"""``--set model_factory=mymodels:build`` with ``mymodels.py`` in the folder the user runs in:
found there without ``PYTHONPATH=.``, handed to the measuring children for that factory only,
and an error that says what to do when it is nowhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from compressor import UsageError, factories
from compressor.children import import_path, python_command
from compressor.cli import cli
from compressor.factories import import_factory


@pytest.fixture
def clean_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """sys.path, sys.modules and the recorded folders as they were, after the test."""
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", ".")])
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    monkeypatch.setattr(factories, "_FOLDERS", [])


def test_a_factory_in_the_working_folder_is_found_and_the_children_get_that_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_path: None) -> None:
    (tmp_path / "mymodels_here.py").write_text("def build():\n    return 'built'\n")
    monkeypatch.chdir(tmp_path)
    assert import_factory("mymodels_here:build", "model_factory")() == "built"
    assert sys.path[-1] == str(tmp_path)  # after everything installed: it shadows nothing
    assert import_path().split(":")[-1] == str(tmp_path)


def test_a_child_never_looks_in_its_working_folder(tmp_path: Path) -> None:
    """A measuring child runs ``python -P`` in the user's folder: it gets a factory's folder
    only through the PYTHONPATH the parent hands it (:func:`import_path`)."""
    (tmp_path / "mymodels_child.py").write_text("def build():\n    return 'built'\n")
    probe = ("import sys\nif sys.path and sys.path[0] in ('', '.'): del sys.path[0]\n"  # as the bootstrap does
             "from compressor.factories import import_factory\n"
             "try:\n    import_factory('mymodels_child:build', 'model_factory')\n"
             "except Exception as error:\n    print(error)\n")
    interpreter = python_command("unused")[:-3]  # python, -P where it has it
    child = subprocess.run([*interpreter, "-c", probe], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": import_path()})
    assert "no module 'mymodels_child'" in child.stdout, child.stdout + child.stderr


def test_a_factory_found_nowhere_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 clean_path: None) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as caught:
        import_factory("nowhere_models:build", "model_factory")
    message = caught.value.message
    assert f"no module 'nowhere_models' on the import path or in the working folder ({tmp_path})" in message
    assert "nowhere_models.py" in message and "PYTHONPATH=/path/to/folder" in message
    # A module that imports but lacks the function, and one whose own import fails, say so.
    (tmp_path / "half_models.py").write_text("import no_such_dependency_xyz\n")
    with pytest.raises(UsageError, match=r"ModuleNotFoundError: No module named 'no_such_dependency_xyz'"):
        import_factory("half_models:build", "model_factory")
    (tmp_path / "empty_models.py").write_text("")
    with pytest.raises(UsageError, match="module 'empty_models' has no 'build'"):
        import_factory("empty_models:build", "model_factory")


def test_compressor_run_finds_mymodels_in_the_folder_it_runs_in(digits, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  clean_path: None) -> None:
    """The user's journey: ``cd project; compressor run weights.pt --set model_factory=mymodels:build``."""
    (tmp_path / "mymodels_run.py").write_text("from compressor_onnx.samples import build_digits_mlp as build\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["run", str(digits.state_dict), "--set", "model_factory=mymodels_run:build",
                                      "-q", "fp16", "--data", str(digits.eval), "--min-seconds", "0",
                                      "--max-examples", "50", "-o", "out"])
    assert result.exit_code == 0, result.output
    variants = json.loads((tmp_path / "out" / "report.json").read_text())["variants"]
    assert variants[1]["metrics"]["agreement"] > 0.9
