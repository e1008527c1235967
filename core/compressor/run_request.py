"""What ``compressor run``, ``measure`` and ``search`` are asked to do: :class:`RunRequest`.

It sits below everything that carries it (the session, the runner, the search, the Ray
executor), so each of them names its type instead of passing ``Any`` along.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from compressor.models import MeasureSettings
from compressor.recipes import Variant


@dataclass
class RunRequest:
    model: Path
    out: Path
    backend: str | None = None
    variants: Sequence[Variant] = ()
    settings: dict[str, str] = field(default_factory=dict)
    data: Path | None = None
    train_data: Path | None = None
    calibration_data: Path | None = None
    force: bool = False
    trust: bool = False
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    repeats: int = 1
    #: Largest allowed accuracy drop versus the original, in percentage points.
    max_accuracy_drop: float | None = None
    #: Smallest allowed share of inputs whose top prediction matches the original's.
    min_agreement: float | None = None
    #: Smallest allowed mean cosine similarity of the compared output to the original's.
    min_cosine: float | None = None
    #: ``compressor measure``: convert and measure the model as it is, no variants.
    original_only: bool = False
    #: Refuse to start when the artifacts would not fit on disk (``--no-space-check``).
    check_space: bool = True
    #: Where variants are made and measured: ``local``, or ``ray`` (a local Ray, or ``ray_address``).
    executor: str = "local"
    ray_address: str | None = None
    #: Seconds to reach ``ray_address`` (None: ``compressor.ray_cluster.DEFAULT_TIMEOUT``).
    ray_timeout: float | None = None

    def given_data(self) -> dict[str, Path | None]:
        """The data files the request names, by purpose (None: not given)."""
        return {"eval": self.data, "train": self.train_data, "calibration": self.calibration_data}
