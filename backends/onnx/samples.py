"""The ``compressor demo`` sample: a small MLP trained on scikit-learn's digits.

It is saved as a ``state_dict`` and rebuilt by ``--set
model_factory=compressor_onnx.samples:build_digits_mlp``, so the demo also
shows the weights-only loading path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FACTORY = "compressor_onnx.samples:build_digits_mlp"
HIDDEN = 64


@dataclass(frozen=True)
class DigitsSplit:
    """Digits images scaled to 0-1 (``x``: N x 64 float32) and their labels."""

    train_x: Any
    train_y: Any
    test_x: Any
    test_y: Any


def build_digits_mlp() -> Any:
    """The untrained digits classifier: 64 pixels -> 64 hidden -> 10 classes."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10)
    )


def digits_split(test_share: float = 0.25, seed: int = 0) -> DigitsSplit:
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(len(x) * (1 - test_share))
    train, test = order[:cut], order[cut:]
    return DigitsSplit(x[train], y[train], x[test], y[test])


def train_digits_mlp(split: DigitsSplit, epochs: int = 60, seed: int = 0) -> Any:
    """Train with Adam on mini-batches; about a second on a laptop CPU."""
    import torch

    torch.manual_seed(seed)
    model = build_digits_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(split.train_x), torch.from_numpy(split.train_y)
    threads = torch.get_num_threads()
    # Batches this small gain nothing from threads, which only contend: on a busy 2-CPU
    # machine, 40 s with two threads against 2 s with one.
    torch.set_num_threads(1)
    try:
        for _ in range(epochs):
            for batch in torch.randperm(len(x)).split(64):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def write_digits_sample(directory: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """Write the trained state_dict, eval.npz and calibration.npz into ``directory`` (a str or a Path)."""
    import numpy as np
    import torch

    directory = Path(directory)

    split = digits_split()
    model = train_digits_mlp(split)
    weights = directory / "digits_mlp.pt"
    torch.save(model.state_dict(), weights)
    eval_data, calibration = directory / "digits_eval.npz", directory / "digits_calibration.npz"
    np.savez(eval_data, x=split.test_x, y=split.test_y)
    np.savez(calibration, x=split.train_x[:256])
    return weights, eval_data, calibration
