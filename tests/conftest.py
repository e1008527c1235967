"""Shared fixtures: the toy backend registered in-process, and small model files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture
def toy_host() -> Iterator[object]:
    """The process-wide plugin host with the pure-Python ``toy`` backend registered."""
    import toy_backend

    from compressor.plugins import get_host

    host = get_host()
    host.register(toy_backend, name="toy")
    try:
        yield host
    finally:
        host.unregister("toy")


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
