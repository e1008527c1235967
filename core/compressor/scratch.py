"""Scratch folders that a later run can recognise and remove once their run is gone
(SIGKILL, power loss), and only then.

``compressor-work-<pid>-xxxx`` in ``$TMPDIR``, ``.compressor-staging-<pid>-xxxx`` in
``--out``, ``compressor-ray-<pid>-xxxx`` for a local Ray: the PID is for humans.
Ownership is a lock: every folder holds a ``.compressor-lock`` file on which its run
keeps an exclusive ``flock`` for the folder's whole life (forked children share it;
it goes when the last of them exits). A folder is stale only when that lock can be
taken, which holds across PID namespaces sharing ``$TMPDIR``, where a PID check
would call a live run dead. Before a stale folder is removed, processes still using
it (a leftover measuring child, a Ray cluster's agents) are stopped.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compressor.errors import RESOURCE_ERRNOS, UsageError, os_problem

WORK, MEASURE, STAGING = "compressor-work", "compressor-measure", ".compressor-staging"
#: A local Ray started by a run, and a Ray task's folders on a node.
RAY, RAY_MAKE, RAY_MEASURE = "compressor-ray", "compressor-ray-make", "compressor-ray-measure"
LOCK = ".compressor-lock"
_OWNED = re.compile(r"^(?P<kind>\.?compressor(?:-[a-z]+)+)-(?P<pid>\d+)-")
#: A folder without a lock (made by an older compressor) is judged by its PID, and
#: only once it is this old: it may be a live run's, being made right now.
_UNLOCKED_GRACE_SECONDS = 60.0
#: Folder -> the descriptor that holds its lock, for every folder this process made.
_held: dict[str, int] = {}


def scratch_root() -> Path:
    """Where scratch folders go: ``$TMPDIR`` as the user set it (Python would quietly
    fall back to another folder when it is unusable), else the system's temporary folder."""
    named = os.environ.get("TMPDIR")
    return Path(named) if named else Path(tempfile.gettempdir())


def make_folder(kind: str, parent: Path | None = None) -> Path:
    """A new private folder ``KIND-PID-xxxx`` in ``parent`` (default :func:`scratch_root`),
    locked by this process until it is removed (or the process ends)."""
    _forget_removed()
    root = parent if parent is not None else scratch_root()
    try:
        folder = Path(tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}-", dir=root))
    except OSError as error:
        if parent is not None:
            raise
        raise tmpdir_error(root, error) from None
    try:
        _lock(folder)
    except OSError as error:
        shutil.rmtree(folder, ignore_errors=True)
        if parent is not None:
            raise
        raise tmpdir_error(root, error) from None
    return folder


def tmpdir_error(root: Path, error: OSError) -> UsageError:
    """A scratch folder that cannot be made or written, as one line naming ``$TMPDIR``."""
    if error.errno in RESOURCE_ERRNOS:
        problem = os_problem(error)
    elif isinstance(error, (FileNotFoundError, NotADirectoryError)):
        problem = "not an existing folder"
    else:
        problem = error.strerror or str(error)
    return UsageError(f"cannot write scratch files in TMPDIR ({root}): {problem}; "
                      "point TMPDIR at a writable folder with free space")


def _lock(folder: Path) -> None:
    # Locked under another name, then renamed: the lock file is never seen unlocked.
    pending = folder / f"{LOCK}.new"
    descriptor = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(descriptor)
        os.unlink(pending)
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
            return  # a filesystem without flock: the folder is judged by its PID and age
        raise
    try:
        os.rename(pending, folder / LOCK)
    except BaseException:
        os.close(descriptor)
        raise
    _held[str(folder)] = descriptor


def remove_folder(folder: Path) -> None:
    """Remove a folder :func:`make_folder` made, and let go of its lock."""
    shutil.rmtree(folder, ignore_errors=True)
    descriptor = _held.pop(str(folder), None)
    if descriptor is not None:
        os.close(descriptor)


def _forget_removed() -> None:
    """Close the locks of folders removed by other means (a long-lived process makes many)."""
    for name in [name for name in _held if not os.path.isdir(name)]:
        os.close(_held.pop(name))


@contextmanager
def scratch_folder(kind: str, parent: Path | None = None) -> Iterator[Path]:
    """:func:`make_folder`, removed on the way out whatever happens."""
    folder = make_folder(kind, parent)
    try:
        yield folder
    finally:
        remove_folder(folder)


def owner_pid(name: str, kind: str) -> int | None:
    match = _OWNED.match(name)
    if match is None or match["kind"] != kind:
        return None
    return int(match["pid"])


def is_stale(path: Path, kind: str) -> bool:
    """A folder of ``kind`` whose run is gone (and which we may remove)."""
    descriptor = _take_lock(path, kind)
    if descriptor is None:
        return False
    if descriptor >= 0:
        os.close(descriptor)
    return True


def _take_lock(path: Path, kind: str) -> int | None:
    """The stale folder's lock, taken (-1: a stale folder without one); None: not stale."""
    pid = owner_pid(path.name, kind)
    if pid is None or str(path) in _held or path.is_symlink() or not path.is_dir():
        return None
    try:
        if path.stat().st_uid != os.getuid():
            return None
        descriptor = os.open(path / LOCK, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return -1 if _unlocked_and_dead(path, pid) else None
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: its run (or a child it forked) is alive
        os.close(descriptor)
        return None
    return descriptor


def _unlocked_and_dead(path: Path, pid: int) -> bool:
    try:
        if time.time() - path.stat().st_mtime < _UNLOCKED_GRACE_SECONDS or pid == os.getpid():
            return False
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def stale_folders(parent: Path, kind: str) -> list[Path]:
    try:
        return [entry for entry in parent.iterdir() if is_stale(entry, kind)]
    except OSError:
        return []


DEFAULT_KINDS = (WORK, MEASURE, RAY, RAY_MAKE, RAY_MEASURE)


def remove_stale(parent: Path | None = None, kinds: tuple[str, ...] = DEFAULT_KINDS) -> None:
    """Delete what killed runs left in ``parent`` (default :func:`scratch_root`), after
    stopping the processes of ours that still use it."""
    folder = parent if parent is not None else scratch_root()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        remove_if_stale(entry, kinds)


def remove_if_stale(folder: Path, kinds: tuple[str, ...]) -> bool:
    """Stop the processes still using ``folder`` and remove it, when it is a stale folder of
    one of ``kinds``; its lock is held meanwhile, so two runs never clean up at once."""
    for kind in kinds:
        descriptor = _take_lock(folder, kind)
        if descriptor is None:
            continue
        try:
            stop_users(folder)
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            if descriptor >= 0:
                os.close(descriptor)
        return True
    return False


def users(folder: Path) -> list[int]:
    """Processes of this user (Linux ``/proc``) with a file in ``folder`` open or named on
    their command line: what a killed run left running there (a measuring child, a Ray
    cluster's processes). A shell that merely has it as its working folder is not one."""
    inside = str(folder.resolve())
    prefix = inside + os.sep
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        process = f"/proc/{entry}"
        try:
            if os.stat(process).st_uid != os.getuid():
                continue
            paths = [os.readlink(f"{process}/fd/{fd}") for fd in os.listdir(f"{process}/fd")]
            with open(f"{process}/cmdline", "rb") as cmdline:
                paths += cmdline.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(path == inside or prefix in path for path in paths):
            found.append(int(entry))
    return found


def stop_users(folder: Path, grace_seconds: float = 2.0) -> None:
    """SIGTERM to every process :func:`users` finds, SIGKILL to those still there after
    ``grace_seconds``."""
    pids = users(folder)
    for signal_number in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, signal_number)
            except OSError:
                continue
        deadline = time.monotonic() + grace_seconds
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if _running(pid)]
            time.sleep(0.05)
        if not pids:
            return


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"  # a zombie has exited
    except (OSError, IndexError):
        return False


def main(argv: list[str]) -> int:
    """The reaper of a local Ray (``python -c ... compressor.scratch FOLDER``): waits until its
    run closes the pipe on its stdin (the run ended, even by SIGKILL), then removes FOLDER
    if it is stale, stopping the cluster's processes left in it."""
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while sys.stdin.buffer.read(65536):
        pass
    folder = Path(argv[0])
    owned = _OWNED.match(folder.name)
    if owned is not None and folder.is_dir():
        remove_if_stale(folder, (owned["kind"],))
    return 0
