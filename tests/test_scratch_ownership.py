"""Scratch folders belong to the run that holds their lock, not to a PID: a live run's
folder is never removed as stale (another PID namespace sharing $TMPDIR), a dead run's
is removed with what it left running; an unusable $TMPDIR is one line; a measuring
child dies with its run."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_core_run import invoke

from compressor import scratch


def dead_pid() -> int:
    """The PID of a process that has exited (as a run in another PID namespace looks)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def foreign_folder(parent: Path, kind: str = scratch.WORK) -> tuple[Path, int]:
    """A scratch folder as another run makes it, named after a dead PID, its lock held here."""
    folder = parent / f"{kind}-{dead_pid()}-abcd1234"
    folder.mkdir()
    (folder / "request.json").write_text("{}")
    lock = os.open(folder / scratch.LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return folder, lock


def test_a_locked_folder_is_kept_whatever_its_pid_says(tmp_path: Path) -> None:
    folder, lock = foreign_folder(tmp_path)
    scratch.remove_stale(tmp_path)
    assert (folder / "request.json").is_file()
    os.close(lock)  # its run ended
    scratch.remove_stale(tmp_path)
    assert not folder.exists()


def test_another_run_keeps_a_live_runs_scratch(toy_host, toy_model, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "tmp"
    shared.mkdir()
    monkeypatch.setenv("TMPDIR", str(shared))
    live, lock = foreign_folder(shared, scratch.MEASURE)
    try:
        result = invoke("run", toy_model["model"], "-q", "fp16", "--min-seconds", "0", "-o", tmp_path / "out")
        assert result.exit_code == 0, result.output
        assert (live / "request.json").is_file()
        assert sorted(path.name for path in shared.iterdir()) == [live.name]
    finally:
        os.close(lock)


def test_a_stale_folder_goes_with_the_processes_left_using_it(tmp_path: Path) -> None:
    folder = tmp_path / f"{scratch.MEASURE}-{dead_pid()}-abcd1234"
    folder.mkdir()
    (folder / scratch.LOCK).touch()
    log = folder / "child.log"
    with log.open("w") as stream:
        leftover = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(120)"],
                                    stdout=stream, start_new_session=True)
    try:
        while not log.read_text() and leftover.poll() is None:  # running, not still starting
            time.sleep(0.02)
        scratch.remove_stale(tmp_path)
        assert leftover.wait(timeout=10) != 0
        assert not folder.exists()
    finally:
        leftover.kill()
        leftover.wait()


def test_a_folder_being_made_is_not_stale(tmp_path: Path) -> None:
    """No lock file yet, and young: it may be a live run's, locked a moment later."""
    folder = tmp_path / f"{scratch.WORK}-{dead_pid()}-abcd1234"
    folder.mkdir()
    scratch.remove_stale(tmp_path)
    assert folder.is_dir()
    old = time.time() - 3600
    os.utime(folder, (old, old))
    scratch.remove_stale(tmp_path)
    assert not folder.exists()


def _without_file_permission_override() -> None:
    """Root writes anywhere: drop that (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) in the child."""
    if os.geteuid() == 0:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):
            libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP


def test_a_read_only_tmpdir_is_one_line_naming_it(tmp_path: Path) -> None:
    from search_backend import write_dial

    files = write_dial(tmp_path / "in")
    read_only = tmp_path / "tmp"
    read_only.mkdir()
    read_only.chmod(0o555)
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER.format(tests=str(Path(__file__).parent)))
    environment = {**os.environ, "TMPDIR": str(read_only)}
    environment.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, str(driver), "run", str(files["model"]), "-q", "int8",
                           "--min-seconds", "0", "-o", str(tmp_path / "out")], capture_output=True, text=True,
                          env=environment, timeout=300, preexec_fn=_without_file_permission_override)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write scratch files in TMPDIR ({read_only})")
    assert "Permission denied" in lines[0] or "Read-only" in lines[0]
    assert not (tmp_path / "out").exists() and list(read_only.iterdir()) == []


_DRIVER = """import sys
sys.path.insert(0, {tests!r})
import search_backend
from compressor.plugins import get_host
get_host().register(search_backend, name="dial")
from compressor.cli import main
main()
"""


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                if entry.isdigit() and int(stat.read().rsplit(b")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


def command(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_the_measuring_child_dies_when_its_run_is_killed(tmp_path: Path) -> None:
    from search_backend import write_dial

    files = write_dial(tmp_path / "in")
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER.format(tests=str(Path(__file__).parent)))
    scratch_folder = tmp_path / "tmp"
    scratch_folder.mkdir()
    environment = {**os.environ, "TMPDIR": str(scratch_folder)}
    environment.pop("PYTHONPATH", None)
    run = subprocess.Popen([sys.executable, str(driver), "run", str(files["model"]), "-q", "int8",
                            "--min-seconds", "60", "-o", str(tmp_path / "out")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
    try:
        deadline = time.monotonic() + 120
        measuring: list[int] = []
        while not measuring and time.monotonic() < deadline and run.poll() is None:
            measuring = [pid for pid in children_of(run.pid) if b"compressor.measure_child" in command(pid)]
            time.sleep(0.1)
        assert measuring, "the run never started measuring"
        run.send_signal(signal.SIGKILL)
        run.wait()
        deadline = time.monotonic() + 10
        while alive(measuring[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(measuring[0])
    finally:
        run.kill()
        run.wait()
    scratch.remove_stale(scratch_folder)
    assert list(scratch_folder.iterdir()) == []


def test_a_measuring_process_that_cannot_write_its_results_says_so(tmp_path: Path) -> None:
    """A full $TMPDIR, as a file size limit stands for it: exit SCRATCH_FAILED, not a crash."""
    from compressor.measure_child import SCRATCH_FAILED

    (tmp_path / "request.json").write_text("{not json")  # fails, and the failure must be written
    script = ("import resource, sys\nresource.setrlimit(resource.RLIMIT_FSIZE, (4, 4))\n"
              "from compressor.measure_child import main\nsys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == SCRATCH_FAILED, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("File too large")
