"""Search trials and variants measured on Ray are compared with the original's decisions (each
output's task, axes, thresholds), as ``compressor run`` compares its variants, not decided
again on each variant's own values; and ``search --ray-timeout`` reaches the executor."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from search_backend import write_dial

from compressor import ray_executor, search_trials
from compressor.cli import cli
from compressor.evaluation import measure_one
from compressor.plugins import get_host
from compressor.ray_executor import made_from, stage
from compressor.session import Session
from compressor.tasks import DECIDED_OPTION


def decisions(options: dict[str, Any]) -> dict[str, Any] | None:
    decided = options.get(DECIDED_OPTION)
    return {name: entry["task"] for name, entry in decided.items()} if decided else None


def test_search_trials_are_measured_with_the_originals_decisions(dial_host, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any] | None] = []

    def spying(host: Any, artifact: Any, data: Any, inputs: Any, settings: Any) -> Any:
        seen.append(decisions(settings.options))
        return measure_one(host, artifact, data, inputs, settings)

    monkeypatch.setattr(search_trials, "measure_one", spying)
    files = write_dial(tmp_path / "in")
    result = CliRunner().invoke(cli, ["search", str(files["model"]), "--data", str(files["data"]), "--max-trials",
                                      "3", "--max-accuracy-drop", "5", "--min-seconds", "0", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert seen[0] is None  # the original decides
    assert len(seen) >= 3 and all(entry == {"logits": "classifier"} for entry in seen[1:]), seen


class LocalRay:
    """Stands in for :class:`RayExecutor`: makes and measures here, through the same data the
    Ray tasks get, recording the measuring settings each batch was sent with."""

    sent: list[dict[str, Any] | None] = []
    timeouts: list[float | None] = []

    def __init__(self, address: str | None, threads: int, modules: Sequence[str], timeout: float | None = None):
        LocalRay.timeouts.append(timeout)
        self.measuring_slots = 2

    def close(self) -> None:
        return None

    def make(self, request: Any, variants: Sequence[Any]) -> list[Any]:
        with tempfile.TemporaryDirectory() as folder:
            local = replace(request, out=Path(folder) / "out", force=True, check_space=False)
            with Session(local, get_host(), lambda message, share: None) as session:
                return [made_from(*session.make(variant)) for variant in variants]

    def measure(self, request: Any, made: Sequence[Any], inputs: Sequence[Any]) -> list[Any]:
        LocalRay.sent.append(decisions(request.measure.options))
        measured = []
        for item in made:
            with tempfile.TemporaryDirectory() as folder:
                artifact = stage(item, Path(folder) / "artifact")
                measured.append(measure_one(get_host(), artifact, request.data, inputs, request.measure))
        return measured


@pytest.fixture
def local_ray(monkeypatch: pytest.MonkeyPatch) -> type[LocalRay]:
    monkeypatch.setattr(ray_executor, "RayExecutor", LocalRay)
    monkeypatch.setattr(LocalRay, "sent", [])
    monkeypatch.setattr(LocalRay, "timeouts", [])
    return LocalRay


def test_variants_measured_on_ray_get_the_originals_decisions(dial_host, local_ray: type[LocalRay],
                                                              tmp_path: Path) -> None:
    files = write_dial(tmp_path / "in")
    result = CliRunner().invoke(cli, ["run", str(files["model"]), "-q", "int8", "-q", "fp16", "--data",
                                      str(files["data"]), "--executor", "ray", "--repeats", "2", "--min-seconds",
                                      "0", "--ray-timeout", "7", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    # The original alone first, deciding; then the variants, then every repeat, with its decisions.
    assert local_ray.sent == [None, {"logits": "classifier"}, {"logits": "classifier"}]
    assert local_ray.timeouts == [7]


def test_a_search_on_ray_measures_its_trials_with_the_originals_decisions(dial_host, local_ray: type[LocalRay],
                                                                          tmp_path: Path) -> None:
    files = write_dial(tmp_path / "in")
    result = CliRunner().invoke(cli, ["search", str(files["model"]), "--data", str(files["data"]), "--max-trials",
                                      "4", "--max-accuracy-drop", "5", "--min-seconds", "0", "--executor", "ray",
                                      "--ray-timeout", "3.5", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert local_ray.timeouts == [3.5]  # search has --ray-timeout too
    assert local_ray.sent[0] is None and len(local_ray.sent) >= 2
    assert all(entry == {"logits": "classifier"} for entry in local_ray.sent[1:]), local_ray.sent


def test_search_refuses_a_ray_timeout_out_of_range(dial_host, tmp_path: Path) -> None:
    files = write_dial(tmp_path / "in")
    result = CliRunner().invoke(cli, ["search", str(files["model"]), "--data", str(files["data"]), "--executor",
                                      "ray", "--ray-timeout", "0", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Invalid value for '--ray-timeout'" in result.output
    assert not (tmp_path / "o").exists()
