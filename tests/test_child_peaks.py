"""A phase's peak RSS counts the processes it started: ``PeakRss`` reports the largest of its
own process's peak and the peaks of the children recorded in it (``run_in_fork`` records its
forked child's; a ``run_python_child`` child sends its own back), blocks nest, and a
child's peak is never this process's lifetime peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from compressor.children import run_in_fork, run_python_child
from compressor.errors import CompressionError, UsageError
from compressor.memory import (
    PeakRss,
    lifetime_peak_rss_bytes,
    note_child_peak,
    peak_rss_bytes,
)

MB = 2**20


def touched(size: int) -> int:
    """``size`` bytes allocated and written (resident), then freed; their length."""
    return len(b"\x01" * size)


def test_a_forked_childs_peak_counts_while_the_parent_stays_small() -> None:
    # A fresh, small parent: its own peak is tens of MB, and a fork shares little of it.
    script = textwrap.dedent("""
        import json
        from compressor.children import run_in_fork
        from compressor.memory import PeakRss, lifetime_peak_rss_bytes, peak_rss_bytes

        def allocate():
            return len(b"\\x01" * (320 << 20))

        with PeakRss() as peak:
            allocated = run_in_fork(allocate, step="allocating")
            own = peak_rss_bytes()
        # A forked child that forks again (a quantizer's pre-processing): the grandchild counts too.
        with PeakRss() as nested:
            run_in_fork(lambda: run_in_fork(allocate, step="allocating"), step="forking")
            nested_own = peak_rss_bytes()
        print(json.dumps({"allocated": allocated, "block": peak.bytes, "own": own, "nested": nested.bytes,
                          "nested_own": nested_own, "lifetime": lifetime_peak_rss_bytes()}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["allocated"] == 320 * MB
    assert figures["own"] < 200 * MB  # the parent never held the 320 MB
    # The child's own peak is its 320 MB plus what of the parent's pages it touched or shares.
    assert figures["block"] >= figures["own"] + 300 * MB
    assert figures["nested_own"] < 200 * MB and figures["nested"] >= figures["nested_own"] + 300 * MB
    # The child's peak is the block's, never this process's own lifetime peak.
    assert figures["lifetime"] < 200 * MB


def test_a_forked_child_that_fails_still_counts() -> None:
    def allocate_then_fail() -> None:
        touched(200 * MB)
        raise CompressionError("the quantizer gave up", "m.onnx")

    with PeakRss() as peak, pytest.raises(CompressionError, match="the quantizer gave up"):
        run_in_fork(allocate_then_fail, step="quantize int8")
    assert peak.bytes is not None and peak.bytes >= 200 * MB


def test_the_forked_child_starts_its_own_mark() -> None:
    """A forked child's reported peak is what it reached itself, not what the parent reached
    before the fork (kernels that copy the mark into a fork would give the parent's past)."""
    touched(300 * MB)
    parent_peak = peak_rss_bytes()  # not reset since: the 300 MB are in this process's mark

    def own_peak() -> int:
        return peak_rss_bytes()

    child_peak = run_in_fork(own_peak, step="reading the mark")
    assert child_peak < parent_peak - 200 * MB
    assert lifetime_peak_rss_bytes() >= parent_peak  # this process's lifetime peak keeps its past


def test_blocks_nest_and_a_childs_peak_counts_in_every_open_block() -> None:
    with PeakRss() as outer:
        touched(250 * MB)  # this process's peak, before the inner block resets the mark
        with PeakRss() as inner:
            in_inner = peak_rss_bytes()
        child = peak_rss_bytes() + 400 * MB
        with PeakRss() as second:
            note_child_peak(child)
    assert outer.bytes is not None and inner.bytes is not None and second.bytes is not None
    assert outer.bytes >= in_inner + 200 * MB  # the inner reset hid nothing from the outer block
    assert inner.bytes < in_inner + 100 * MB  # the inner block began after the 250 MB were freed
    assert outer.bytes >= child and second.bytes >= child
    assert lifetime_peak_rss_bytes() < child  # a child's peak is not this process's
    with PeakRss() as later:
        pass
    assert later.bytes is not None and later.bytes < child  # recorded only in blocks open then
    note_child_peak(10 * child)  # outside every block: counted nowhere, and no error


CHILD_MODULE = '''
import os
import signal
import sys
from pathlib import Path

from compressor.memory import peak_rss_bytes


def main(argv):
    if argv[0] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if argv[0] == "sleep":
        Path(argv[1]).write_text(str(os.getpid()))
        import time

        time.sleep(120)
    if argv[0] == "segfault":
        import ctypes

        ctypes.string_at(0)
    size = int(argv[0]) << 20
    print("allocating", size, "in", os.getpid(), "with TMPDIR", os.environ.get("TMPDIR"), flush=True)
    print("a warning", file=sys.stderr)
    Path(argv[1]).write_text(str(len(b"\\x01" * size) and peak_rss_bytes()))
    return 3
'''


@pytest.fixture
def child_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / "peak_probe_child.py").write_text(CHILD_MODULE)
    monkeypatch.syspath_prepend(str(folder))  # the child's PYTHONPATH is this process's sys.path
    return "peak_probe_child"


def test_a_fresh_interpreter_child_runs_apart_and_sends_its_peak(child_module: str, tmp_path: Path) -> None:
    printed, peak_file = tmp_path / "printed.txt", tmp_path / "peak"
    status = run_python_child(child_module, ["300", str(peak_file)], printed, step="probing",
                              environment={"TMPDIR": str(tmp_path)})
    assert status == 3
    lines = printed.read_text().splitlines()
    assert lines[0].startswith("allocating 314572800 in ") and lines[0].endswith(f"with TMPDIR {tmp_path}")
    assert int(lines[0].split()[3]) != os.getpid() and lines[1] == "a warning"
    # exec gives the child a new mark: its peak is its own 300 MB and interpreter, not this process's.
    child_peak = int(peak_file.read_text())
    assert 300 * MB <= child_peak < 300 * MB + 150 * MB


def test_a_fresh_interpreter_childs_death_is_one_line(child_module: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"out of memory while applying 'probing' \(killed by SIGKILL"):
        run_python_child(child_module, ["kill"], tmp_path / "printed.txt", step="probing")
    with pytest.raises(CompressionError, match=r"applying 'probing' crashed the native code \(SIGSEGV\)"):
        run_python_child(child_module, ["segfault"], tmp_path / "printed.txt", step="probing")


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGINT"])
def test_a_fresh_interpreter_child_dies_with_its_parent_or_on_ctrl_c(child_module: str, tmp_path: Path,
                                                                      signal_name: str) -> None:
    import signal
    import time

    pid_file = tmp_path / "child.pid"
    script = (f"from pathlib import Path\nfrom compressor.children import run_python_child\n"
              f"run_python_child({child_module!r}, ['sleep', {str(pid_file)!r}], Path({str(tmp_path / 'p.txt')!r}), "
              "step='sleeping')\n")
    def as_a_shell_starts_it() -> None:
        """Signals as a terminal's process gets them: an ignored or blocked SIGINT survives exec,
        and a test that ran earlier in this worker may have left one (Python then installs no
        KeyboardInterrupt handler, and the parent would sleep through the signal)."""
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])

    parent = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                              stderr=subprocess.DEVNULL, preexec_fn=as_a_shell_starts_it)
    try:
        deadline = time.monotonic() + 60
        while not pid_file.is_file() or not pid_file.read_text():
            assert time.monotonic() < deadline and parent.poll() is None, "the child never started"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert running(child)
        parent.send_signal(getattr(signal, signal_name))  # the parent alone, not its process group
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(child)
    finally:
        parent.kill()
        parent.wait()
