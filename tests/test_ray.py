"""--executor ray: a local Ray started by the run, and a two-node local cluster where
trials spread across nodes and each node measures one artifact at a time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from search_backend import write_dial

from compressor import scratch
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def closed_port() -> int:
    """A localhost port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_unreachable_address_is_one_line_within_the_timeout(dial_host, tmp_path: Path, scheme: str) -> None:
    files = write_dial(tmp_path / "in")
    address = f"{scheme}127.0.0.1:{closed_port()}"
    started = time.monotonic()
    result = invoke("run", files["model"], "-q", "int8", "--executor", "ray", "--ray-address", address,
                    "--ray-timeout", "1.5", "-o", tmp_path / "out")
    took = time.monotonic() - started
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach the Ray cluster at --ray-address {address} "
                                                   "within 1.5 s"), result.stderr
    assert 1.5 <= took < 15, took
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


def test_search_gives_up_on_an_unreachable_address_within_its_timeout(dial_host, tmp_path: Path) -> None:
    files = write_dial(tmp_path / "in")
    address = f"127.0.0.1:{closed_port()}"
    started = time.monotonic()
    result = invoke("search", files["model"], "--data", files["data"], "--executor", "ray", "--ray-address",
                    address, "--ray-timeout", "1.5", "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: cannot reach the Ray cluster at --ray-address {address} within 1.5 s")
    assert time.monotonic() - started < 15
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


@pytest.mark.slow
def test_the_steps_of_a_ray_run_are_those_of_a_local_run(toy_host, toy_model, tmp_path: Path) -> None:
    """``quantize dynamic`` has a default (bits=8): neither side spells it out."""
    common = ("run", toy_model["model"], "-q", "dynamic", "--prune", "0.5", "--data", toy_model["eval"],
              "--min-seconds", "0")
    local = invoke(*common, "-o", tmp_path / "local")
    remote = invoke(*common, "--executor", "ray", "-o", tmp_path / "ray")
    assert local.exit_code == 0 and remote.exit_code == 0, remote.output
    steps = [[v["name"], v["steps"]] for v in report(tmp_path / "local")["variants"]]
    assert steps == [[v["name"], v["steps"]] for v in report(tmp_path / "ray")["variants"]]
    assert steps[1:] == [["prune0.5-dynamic", ["prune 0.5", "quantize dynamic"]]]


_DRIVER = """import sys
sys.path.insert(0, {tests!r})
import search_backend
from compressor.plugins import get_host
get_host().register(search_backend, name="dial")
from compressor.cli import main
main()
"""


def _owned_by(pid: int) -> list[Path]:
    return [path for path in Path("/tmp").glob(f"{scratch.RAY}-{pid}-*")]


@pytest.mark.slow
def test_sigterm_stops_a_ray_run_and_its_local_cluster(tmp_path: Path) -> None:
    files = write_dial(tmp_path / "in")
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER.format(tests=str(Path(__file__).parent)))
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    environment = {**os.environ, "TMPDIR": str(scratch_root)}
    environment.pop("PYTHONPATH", None)
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, str(driver), "run", str(files["model"]), "-q", "int8", "--data",
                            str(files["data"]), "--min-seconds", "60", "--executor", "ray", "-o", str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    try:
        deadline = time.monotonic() + 180
        while not any(p.name.startswith(f"{scratch.RAY_MEASURE}-") for p in scratch_root.iterdir()):
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.2)
        cluster = _owned_by(run.pid)
        assert len(cluster) == 1  # the local Ray's folder, named after its run
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 143, stderr
    assert stderr.strip().splitlines() == ["error: terminated by SIGTERM"]
    assert not out.exists() and list(scratch_root.iterdir()) == []
    assert not cluster[0].exists() and scratch.users(cluster[0]) == []


def test_a_local_cluster_left_by_a_killed_run_is_stopped_and_removed(tmp_path: Path) -> None:
    """The run's reaper cleans up right after a SIGKILL; the next run would, had it been killed too."""
    owner = subprocess.Popen(
        [sys.executable, "-c", "from compressor.ray_cluster import LocalRay\nimport sys, time\n"
         "local = LocalRay()\nprint(local.folder, flush=True)\ntime.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    folder = Path(owner.stdout.readline().strip())
    assert folder.is_dir() and folder.name.startswith(f"{scratch.RAY}-{owner.pid}-")
    log = folder / "session" / "logs" / "raylet.out"
    log.parent.mkdir(parents=True)
    with log.open("w") as stream:  # stands for a Ray process left running: it writes in the folder
        leftover = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(120)"],
                                    stdout=stream, start_new_session=True)
    try:
        while not log.read_text() and leftover.poll() is None:
            time.sleep(0.02)
        owner.kill()
        owner.wait()
        assert leftover.wait(timeout=30) != 0
        deadline = time.monotonic() + 10
        while folder.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not folder.exists()
    finally:
        leftover.kill()
        leftover.wait()


def test_the_next_run_removes_a_stale_local_cluster(tmp_path: Path) -> None:
    from compressor.ray_cluster import LocalRay

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Path("/tmp") / f"{scratch.RAY}-{dead.pid}-{tmp_path.name[-8:]}"
    (stale / "session").mkdir(parents=True)
    (stale / scratch.LOCK).touch()
    with (stale / "session" / "gcs_server.out").open("w") as stream:
        leftover = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(120)"],
                                    stdout=stream, start_new_session=True)
    try:
        while not (stale / "session" / "gcs_server.out").read_text() and leftover.poll() is None:
            time.sleep(0.02)
        local = LocalRay()
        try:
            # Another test process's run may be removing it at this moment (it then holds the
            # folder's lock, and this one leaves the folder to it): gone within seconds either way.
            deadline = time.monotonic() + 10
            while stale.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not stale.exists() and leftover.wait(timeout=10) != 0
            assert local.folder.name.startswith(f"{scratch.RAY}-{os.getpid()}-")
        finally:
            local.close()
        assert not local.folder.exists()
    finally:
        leftover.kill()
        leftover.wait()
        shutil.rmtree(stale, ignore_errors=True)
