"""Outputs too big to hold for every example (a language model's logits: tokens x vocabulary
per example) are compared on the first examples that fit, the same ones for every variant."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compressor import engine
from compressor.models import Dataset, MeasureSettings, TensorSpec
from compressor.runtime import Runtime

VOCABULARY, TOKENS = 50, 12


class BigramLogits(Runtime):
    """Logits ``[batch, tokens, vocabulary]`` from a bigram table; ``scale`` perturbs them."""

    inputs = (TensorSpec("input_ids", (None, TOKENS), "int64"),)
    outputs = (TensorSpec("logits", (None, TOKENS, VOCABULARY), "float32"),)

    def __init__(self, scale: float = 0.0) -> None:
        generator = np.random.default_rng(0)
        self.table = generator.normal(size=(VOCABULARY, VOCABULARY)).astype(np.float32)
        self.table += scale * generator.normal(size=self.table.shape).astype(np.float32)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        return {"logits": self.table[np.asarray(feeds["input_ids"])]}


def test_big_outputs_are_compared_on_the_first_examples_that_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = np.random.default_rng(1).integers(0, VOCABULARY, size=(40, TOKENS)).astype(np.int64)
    data = Dataset(Path("ids.npz"), {"input_ids": ids}, None, len(ids))
    settings = MeasureSettings(options={"eval_batch": 4, "batch_seconds": 0.01}, min_seconds=0)
    whole = engine.measure_runtime(BigramLogits(), data, settings)
    assert "compared_examples" not in whole.metrics
    per_example = TOKENS * VOCABULARY
    monkeypatch.setattr(engine, "MAX_RETAINED_VALUES", 10 * per_example)
    original = engine.measure_runtime(BigramLogits(), data, settings)
    variant = engine.measure_runtime(BigramLogits(scale=0.1), data, settings)
    # Batches of 4 while the next one fits: 8 examples (12 would be over 10 examples' values).
    assert original.metrics["compared_examples"] == variant.metrics["compared_examples"] == 8
    assert original.outputs["logits"]["task"] == "language-model"
    for measured in (original, variant):
        assert all(len(array) == 8 for array in measured.kept["logits"].values())
    # What is kept is the whole run's first 8 examples.
    for kind, array in whole.kept["logits"].items():
        assert np.array_equal(original.kept["logits"][kind], array[:8]), kind
