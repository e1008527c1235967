"""A language model's logits held for comparison (up to 268 M numbers) are scored in blocks:
perplexity's terms and the logits' cosine equal the whole-array formulas, and the float64
temporaries stay a block's size (the whole array took 6 GB more in the measuring process
of a 233 MB Llama, and as much again in the run's process)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from compressor import fidelity, tasks


def whole_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    shifted = logits[:, :-1].astype(np.float64)
    top = shifted.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(shifted - top).sum(axis=-1)) + top[..., 0]
    return (log_norm - np.take_along_axis(shifted, ids[:, 1:, None], axis=-1)[..., 0]).astype(np.float32)


def whole_cosine(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    similarity = (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return float(similarity.mean()), float(similarity.min())


@pytest.mark.parametrize("chunk", [1 << 22, 1000, 7])
def test_blocks_give_the_whole_array_figures(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "NLL_CHUNK", chunk)
    monkeypatch.setattr(fidelity, "COSINE_CHUNK", chunk)
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(3, 37, 300)).astype(np.float32)
    ids = rng.integers(0, 300, size=(3, 37))
    np.testing.assert_allclose(tasks._next_token_nll(logits, ids), whole_nll(logits, ids), rtol=1e-6)
    noisy = logits + rng.normal(0, 1, size=logits.shape).astype(np.float32)
    found = fidelity.cosine(logits, noisy)
    assert found is not None
    assert (found["mean"], found["min"]) == pytest.approx(whole_cosine(logits, noisy), rel=1e-12)
    assert found["min"] < found["mean"] < 1
    vectors = rng.normal(size=(50, 16)).astype(np.float32)  # many short rows: blocks of rows
    assert fidelity.cosine(vectors, vectors)["min"] == pytest.approx(1.0)  # type: ignore[index]


def test_the_float64_temporaries_are_a_block_not_the_array() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 257, 32000)).astype(np.float32)  # 66 MB; 132 MB in float64
    ids = rng.integers(0, 32000, size=(2, 257))
    other = logits * np.float32(0.5)
    tracemalloc.start()
    try:
        nll = tasks._next_token_nll(logits, ids)
        _, nll_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        found = fidelity.cosine(logits, other)
        _, cosine_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    block = 8 * (1 << 22)  # a block of float64
    assert nll_peak < 4 * block and cosine_peak < 4 * block, (nll_peak, cosine_peak)
    assert np.isfinite(nll).all() and found is not None and found["min"] == pytest.approx(1.0)


def test_the_held_outputs_are_stacked_without_a_second_copy() -> None:
    from compressor.engine import _stacked
    from compressor.memory import peak_rss_bytes, reset_peak_rss

    def resident() -> int:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))

    # Parts of 40 MB: over glibc's largest mmap threshold, so each one freed goes back to the OS
    # (a part or two may still be resident at the peak, as measured in a busy xdist worker).
    parts = [np.full((10, 1024, 1024), index, dtype=np.float32) for index in range(8)]
    total = sum(part.nbytes for part in parts)
    assert reset_peak_rss()
    before = resident()
    whole = _stacked(parts)
    grown = peak_rss_bytes() - before
    assert whole.shape == (8, 10, 1024, 1024) and whole[1, 0, 0, 0] == 1 and whole[7, -1, -1, -1] == 7
    assert all(part is None for part in parts)
    assert grown < total * 0.5, (grown, total)  # np.stack: the parts and the stack, twice at its end
