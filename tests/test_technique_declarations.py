"""A technique is known to core only from its declaration: a third party's ``round``
(round_backend.py) gets a bare value, a ``compressor run`` option, a disk estimate and
its place among steps without a line of core naming it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import registered

from compressor.cli import cli
from compressor.diskspace import estimated_artifact_bytes
from compressor.recipes import Variant, parse_recipe, parse_step
from compressor.search_space import from_backend


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def round_host() -> Iterator[object]:
    with registered("round_backend", "round") as host:
        yield host


@pytest.fixture
def round_model(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(3)
    weights = rng.normal(size=(12, 5)).astype(np.float32)
    model = tmp_path / "model.round"
    with model.open("wb") as stream:
        np.savez(stream, w=weights)
    x = rng.normal(size=(60, 12)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x, y=(x @ weights).argmax(1))
    return {"model": model, "data": tmp_path / "eval.npz"}


def test_the_option_exists_only_while_a_backend_declares_it(round_host) -> None:
    text = " ".join(invoke("run", "--help").output.split())
    assert "--round N Round weights to N decimals. [x>=0]" in text
    assert "--prune S" in text and "-q, --quantize MODE" in text


def test_the_option_is_absent_without_the_backend() -> None:
    assert "--round" not in invoke("run", "--help").output
    assert invoke("run", "m.round", "--round", "2", "-o", "out").exit_code == 2


def test_a_bare_value_sets_the_declared_parameter(round_host) -> None:
    step = parse_step("round 3")
    assert dict(step.params) == {"decimals": "3"} and str(step) == "round 3" and step.slug == "round3"
    recipe = parse_recipe({"variants": {"coarse": {"steps": ["round 1", "prune 0.5"]}}})
    assert [dict(s.params) for s in recipe[0].steps] == [{"decimals": "1"}, {"sparsity": "0.5"}]


def test_the_disk_estimate_and_the_search_order_come_from_the_declaration(round_host) -> None:
    from round_backend import ROUND, compressor_backends

    backend = next(iter(compressor_backends()))
    variant = Variant("r", (parse_step("round 2"),))
    assert estimated_artifact_bytes(1000, variant, backend.techniques) == 250
    assert estimated_artifact_bytes(1000, variant) == 250  # from the installed declaration
    assert [stage.technique for stage in from_backend(backend)] == ["round", "prune"]
    assert ROUND.order < backend.techniques["prune"].order


def test_a_run_with_the_option_makes_one_variant_per_value_in_declared_order(round_host, round_model,
                                                                                tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("run", round_model["model"], "--round", "2", "--round", "0", "--prune", "0.5",
                    "--data", round_model["data"], "--min-seconds", "0", "-o", out)
    assert result.exit_code == 0, result.output
    variants = {v["name"]: v for v in json.loads((out / "report.json").read_text())["variants"]}
    assert set(variants) == {"original", "round2-prune0.5", "round0-prune0.5"}
    assert variants["round2-prune0.5"]["steps"] == ["round 2", "prune 0.5"]
    # steps ran in the declared order (round before prune), and the coarser rounding changed more answers
    assert variants["round0-prune0.5"]["metrics"]["agreement"] < variants["round2-prune0.5"]["metrics"]["agreement"]
