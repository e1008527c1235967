"""Interrupted and killed runs remove only what they wrote, and leave nothing in $TMPDIR."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import snapshot
from test_child_isolation import compressor_command
from test_core_faults import InterruptedSave, invoke

from compressor import hookimpl, outputs


class WritesBesideTheRun:
    """Another process (or the user) drops a file into --out, then Ctrl-C arrives."""

    @hookimpl(wrapper=True)
    def compressor_save(self, model, destination, context):
        yield
        out = destination.parent.parent.parent
        (out / "user-notes.txt").write_text("mine")
        raise KeyboardInterrupt


def test_ctrl_c_keeps_files_others_put_in_a_folder_the_run_created(toy_host, toy_model, tmp_path) -> None:
    out = tmp_path / "out"
    toy_host.register(WritesBesideTheRun(), name="beside")
    try:
        result = invoke("run", toy_model["model"], "-q", "fp16", "-o", out)
    finally:
        toy_host.unregister("beside")
    assert result.exit_code == 130
    assert sorted(p.name for p in out.iterdir()) == ["user-notes.txt"]
    assert (out / "user-notes.txt").read_text() == "mine"


def test_an_interrupt_while_publishing_restores_the_replaced_files(
    toy_host, toy_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    assert invoke("run", toy_model["model"], "-q", "fp16", "-o", out).exit_code == 0
    (out / "user-notes.txt").write_text("mine")
    before = snapshot(out)
    real_write = outputs.atomic_write_text

    def interrupted(path: Path, text: str) -> None:
        if path.name == "report.html":
            raise KeyboardInterrupt
        real_write(path, text)

    monkeypatch.setattr(outputs, "atomic_write_text", interrupted)
    result = invoke("run", toy_model["model"], "-q", "fp16", "-q", "dynamic", "-o", out, "--force")
    assert result.exit_code == 130
    assert snapshot(out) == before


def test_a_failed_run_removes_the_parent_folders_it_created(toy_host, toy_model, tmp_path) -> None:
    out = tmp_path / "a" / "b" / "out"
    toy_host.register(InterruptedSave(), name="interrupt")
    try:
        result = invoke("run", toy_model["model"], "-q", "fp16", "-o", out)
    finally:
        toy_host.unregister("interrupt")
    assert result.exit_code == 130
    assert not (tmp_path / "a").exists()


def test_a_dangling_symlink_as_out_is_a_usage_error(toy_host, toy_model, tmp_path) -> None:
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    result = invoke("run", toy_model["model"], "-q", "fp16", "-o", out)
    assert result.exit_code == 2
    assert "symlink to nothing" in result.stderr
    assert out.is_symlink() and not (tmp_path / "nowhere").exists()


def _slow_run(tmp_path: Path, out: Path, scratch: Path) -> subprocess.Popen[str]:
    """A real run that spends seconds measuring, in its own $TMPDIR."""
    from onnx_fixtures import make_digits_files

    digits = make_digits_files(tmp_path / "model")
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["TMPDIR"] = str(scratch)
    return subprocess.Popen(
        [*compressor_command(), "run", str(digits.onnx), "-q", "dynamic", "--data", str(digits.eval),
         "--repeats", "20", "--min-seconds", "1", "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
    )


def _wait_for_staging(out: Path, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if out.is_dir() and any(p.name.startswith(".compressor-staging-") for p in out.iterdir()) \
                and any(p.suffix == ".onnx" for p in out.rglob("*.onnx")):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    raise AssertionError("the run never reached measuring")


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(tmp_path: Path, signal_number: int) -> None:
    out, scratch = tmp_path / "out", tmp_path / "tmp"
    scratch.mkdir()
    process = _slow_run(tmp_path, out, scratch)
    _wait_for_staging(out, process)
    time.sleep(0.5)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal_number, stderr
    assert stderr.strip().splitlines()[-1] == f"error: terminated by {signal.Signals(signal_number).name}"
    assert not out.exists()
    assert list(scratch.iterdir()) == []


def test_the_next_run_clears_what_a_killed_run_left(tmp_path: Path) -> None:
    out, scratch = tmp_path / "out", tmp_path / "tmp"
    scratch.mkdir()
    process = _slow_run(tmp_path, out, scratch)
    _wait_for_staging(out, process)
    process.kill()
    process.communicate(timeout=60)
    assert any(p.name.startswith(".compressor-staging-") for p in out.iterdir())
    assert any(p.name.startswith("compressor-") for p in scratch.iterdir())
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["TMPDIR"] = str(scratch)
    model = next((tmp_path / "model").glob("*.onnx"))
    rerun = subprocess.run(
        [*compressor_command(), "run", str(model), "-q", "dynamic", "--min-seconds", "0",
         "-o", str(out)], capture_output=True, text=True, env=environment, timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert list(scratch.iterdir()) == []


def test_a_reader_that_goes_away_stops_the_listing_quietly() -> None:
    """``compressor backends | head -1`` printed "unexpected BrokenPipeError" and exited 1."""
    process = subprocess.Popen([*compressor_command(), "backends"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before the listing is written: every write meets a closed pipe
    errors = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141 and errors == ""
