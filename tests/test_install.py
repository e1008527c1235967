"""One install for everything the README shows: ``pip install -c constraints.txt '.[all]'``.

The whole journey (a fresh venv, the README's two commands, ``pip check``) is ``tox -e
journeys``, too slow for CI; here, what is cheap: this environment has no broken
requirement, ``all`` holds every extra an error message or the README tells users to
install, and the README installs tox with the constraints that keep it beside the
typing-extensions litert-torch's xdsl needs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Extras for developers, not users: all need not hold them.
NOT_FOR_USERS = {"all", "test", "bench"}
#: Extras users choose on purpose, left out of all: gguf compiles llama.cpp from its sdist (minutes).
OPT_IN = {"gguf"}


def _pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _closure(extra: str, extras: dict[str, list[str]]) -> set[str]:
    """``extra`` and every extra it pulls in through ``compressor[...]`` requirements."""
    found, todo = set(), [extra]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        for requirement in extras[name]:
            nested = re.fullmatch(r"compressor\[([\w,]+)\]", requirement.strip())
            if nested:
                todo += nested.group(1).split(",")
    return found


def test_pip_check_is_clean_in_this_environment() -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_all_extra_holds_every_extra_users_are_told_to_install() -> None:
    extras = _pyproject()["project"]["optional-dependencies"]
    in_all = _closure("all", extras)
    sources = [*ROOT.glob("core/compressor/*.py"), *ROOT.glob("backends/*/*.py"),
               *ROOT.glob("frontends/**/*.py"), ROOT / "README.md"]
    # Install hints (``pip install 'compressor[cross]'``) and each backend's declared ``extra=``.
    named = {name for path in sources
             for group in re.findall(r"compressor\[([a-z,]+)\]|extra=\"([a-z]+)\"", path.read_text(encoding="utf-8"))
             for name in ",".join(group).split(",") if name}
    assert {"cross", "pandas", "ray", "onnx", "tflite", "torch"} <= named | in_all
    assert named - NOT_FOR_USERS - OPT_IN <= in_all, sorted(named - NOT_FOR_USERS - OPT_IN - in_all)
    requirements = {requirement.split("=")[0].split(">")[0].strip() for name in in_all
                    for requirement in extras[name]}
    # --backend tflite on a PyTorch model, Keras on --backend onnx, and Report.to_pandas.
    assert {"litert-torch", "tf2onnx", "pandas"} <= requirements


def test_the_readme_installs_tox_within_the_constraints() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = re.search(r"## Quick start\s+```bash\n(.*?)```", text, re.S)
    assert quick_start, "README.md has no quick start block"
    lines = [line.strip() for line in quick_start.group(1).splitlines() if line.strip()]
    assert lines[0].startswith("pip install -c constraints.txt '.[all]'")
    assert lines[1].startswith("pip install -c constraints.txt tox")
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("tox")]
    # tox 4.59 and later need typing-extensions>=4.15 below Python 3.13; litert-torch's xdsl 0.28 needs <4.13.
    assert pins and all("<4.59" in pin or "<4.28" in pin for pin in pins), pins
