"""Shared fixtures: the toy backend registered in-process, and small model files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["COMPRESSOR_CACHE"] = "off"  # no reuse across tests: tests/test_cache.py turns it on in tmp_path
# No half-second timing floor per measurement (the tests check figures, not speed): the tests of
# timing pass --min-seconds or min_seconds themselves, which wins over the variable.
os.environ["COMPRESSOR_MIN_SECONDS"] = "0"


# In each pytest-xdist worker, before any framework is imported: torch, TensorFlow and the BLAS
# libraries otherwise start a thread per CPU in every worker, and with as many workers as CPUs
# their threads spin waiting for each other (a torch fine-tuning test took 10.2 s with two threads
# beside another worker, 2.4 s with one). Only workers set them (the controlling process's
# environment is every worker's); a value the user set wins.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))
    _threads = str(max(1, len(os.sched_getaffinity(0)) // _workers))
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ.setdefault(_variable, _threads)


@contextmanager
def registered(module_name: str, name: str) -> Iterator[object]:
    """The process-wide plugin host with the test backend ``module_name`` registered as ``name``."""
    import importlib

    from compressor.plugins import get_host

    host = get_host()
    host.register(importlib.import_module(module_name), name=name)
    try:
        yield host
    finally:
        host.unregister(name)


@pytest.fixture
def toy_host() -> Iterator[object]:
    """The pure-Python ``toy`` backend (a linear classifier measured by core through its ``ToyRuntime``)."""
    with registered("toy_backend", "toy") as host:
        yield host


@pytest.fixture
def dial_host() -> Iterator[object]:
    """The NumPy ``dial`` backend of search_backend.py (measured by core through a runtime)."""
    with registered("search_backend", "dial") as host:
        yield host


@pytest.fixture
def heads_host() -> Iterator[object]:
    """The NumPy multi-head ``heads`` backend of runtime_backend.py."""
    with registered("runtime_backend", "heads") as host:
        yield host


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> object:
    """The trained digits MLP of onnx_fixtures (state_dict, ONNX, eval and calibration
    data), trained once per session; tests must not change its files."""
    from onnx_fixtures import make_digits_files

    return make_digits_files(tmp_path_factory.mktemp("digits"))


@pytest.fixture
def toy_model(tmp_path: Path) -> dict[str, Path]:
    """A 16x4 toy classifier, labelled eval data and calibration data."""
    rng = np.random.default_rng(7)
    weights = rng.normal(size=(16, 4))
    folder = tmp_path / "inputs"
    folder.mkdir()
    model = folder / "model.toy"
    model.write_text(json.dumps({"weights": weights.tolist(), "bias": [0.0] * 4}))
    x = rng.normal(size=(200, 16)).astype("float32")
    np.savez(folder / "eval.npz", x=x, y=(x @ weights).argmax(1))
    np.savez(folder / "calib.npz", x=x[:50])
    return {"model": model, "eval": folder / "eval.npz", "calib": folder / "calib.npz",
            "folder": folder}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, to prove inputs stay untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def private_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty $TMPDIR of the test's own (also :mod:`tempfile`'s), to prove a run leaves nothing there."""
    import tempfile

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder
