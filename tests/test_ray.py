"""--executor ray: a local Ray started by the run, and a two-node local cluster where
trials spread across nodes and each node measures one artifact at a time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from search_backend import write_dial

from compressor.cli import cli
from compressor.ray_executor import MEASURE_RESOURCE

ray = pytest.importorskip("ray", reason="the ray extra is not installed (CI installs it)")




def invoke(*args: object) -> Any:
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def report(out: Path) -> dict[str, Any]:
    return json.loads((out / "report.json").read_text())


def test_run_on_a_local_ray_matches_a_local_run(dial_host, tmp_path: Path) -> None:
    files = write_dial(tmp_path / "in")
    common = ("run", files["model"], "-q", "int8", "--prune", "0.5", "--data", files["data"], "--min-seconds", "0")
    local = invoke(*common, "-o", tmp_path / "local")
    remote = invoke(*common, "--executor", "ray", "-o", tmp_path / "ray")
    assert local.exit_code == 0 and remote.exit_code == 0, remote.output
    for here, there in zip(report(tmp_path / "local")["variants"], report(tmp_path / "ray")["variants"]):
        assert here["name"] == there["name"] and here["metrics"]["agreement"] == there["metrics"]["agreement"]
        assert here["metrics"]["size_bytes"] == there["metrics"]["size_bytes"]
        assert there["metrics"]["node"] and there["metrics"]["cpu_model"]
    assert (tmp_path / "ray" / "prune0_5-int8.dial").is_file()
    assert not ray.is_initialized()


def test_search_on_ray_finds_the_local_winner(dial_host, tmp_path: Path) -> None:
    files = write_dial(tmp_path / "in")
    common = ("search", files["model"], "--data", files["data"], "--max-accuracy-drop", 2,
              "--max-trials", 8, "--seed", 1, "--min-seconds", "0")
    assert invoke(*common, "-o", tmp_path / "local").exit_code == 0
    assert invoke(*common, "--executor", "ray", "-o", tmp_path / "ray").exit_code == 0
    winners = [report(tmp_path / name)["settings"]["search"]["winner"] for name in ("local", "ray")]
    assert winners[0] == winners[1]


@pytest.fixture
def two_nodes() -> Iterator[str]:
    from ray.cluster_utils import Cluster

    # The user's own cluster in real use: it keeps Ray's default folders.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {MEASURE_RESOURCE: 1}})
    cluster.add_node(num_cpus=1, resources={MEASURE_RESOURCE: 1})
    cluster.wait_for_nodes()
    try:
        yield cluster.address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def test_a_cluster_spreads_variants_and_measures_one_at_a_time_per_node(
    dial_host, tmp_path: Path, two_nodes: str
) -> None:
    files = write_dial(tmp_path / "in")
    out = tmp_path / "out"
    result = invoke("run", files["model"], "-q", "fp16", "-q", "int8", "-q", "int4", "--prune", "0.25",
                    "--data", files["data"], "--min-seconds", "0.3", "--executor", "ray",
                    "--ray-address", two_nodes, "-o", out)
    assert result.exit_code == 0, result.output
    variants = report(out)["variants"]
    nodes = {v["metrics"]["node"] for v in variants}
    assert len(nodes) == 2, nodes
    for node in nodes:
        spans = sorted(v["metrics"]["measured_between"] for v in variants if v["metrics"]["node"] == node)
        assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:])), spans


def test_a_variant_that_fails_on_ray_fails_alone(dial_host, tmp_path: Path) -> None:
    files = write_dial(tmp_path / "in")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[variants.ok]\nsteps = ["quantize int8"]\n[variants.bad]\nsteps = ["prune 1.0"]\n')
    out = tmp_path / "out"
    result = invoke("run", files["model"], "--recipe", recipe, "--data", files["data"], "--min-seconds", "0",
                    "--executor", "ray", "-o", out)
    assert result.exit_code == 7, result.output
    variants = {v["name"]: v for v in report(out)["variants"]}
    assert variants["bad"]["error"] and variants["ok"]["error"] is None
    assert (out / "ok.dial").is_file() and not (out / "bad.dial").exists()
