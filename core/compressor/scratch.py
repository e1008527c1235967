"""Scratch folders named after the process that owns them, so that a later run
can recognise and remove what a killed run (SIGKILL, power loss) left behind.

``compressor-work-<pid>-xxxx`` in ``$TMPDIR``, ``.compressor-staging-<pid>-xxxx``
in ``--out``: a folder whose process no longer exists is stale.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

WORK, MEASURE, STAGING = "compressor-work", "compressor-measure", ".compressor-staging"
_OWNED = re.compile(r"^(?P<kind>\.?compressor-[a-z]+)-(?P<pid>\d+)-")


def make_folder(kind: str, parent: Path | None = None) -> Path:
    """A new private folder ``KIND-PID-xxxx`` in ``parent`` (default ``$TMPDIR``)."""
    return Path(tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}-", dir=parent))


@contextmanager
def scratch_folder(kind: str, parent: Path | None = None) -> Iterator[Path]:
    """:func:`make_folder`, removed on the way out whatever happens."""
    folder = make_folder(kind, parent)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def owner_pid(name: str, kind: str) -> int | None:
    match = _OWNED.match(name)
    if match is None or match["kind"] != kind:
        return None
    return int(match["pid"])


def is_stale(path: Path, kind: str) -> bool:
    """A folder of ``kind`` whose owning process is gone (and which we may remove)."""
    pid = owner_pid(path.name, kind)
    if pid is None or pid == os.getpid() or not path.is_dir() or path.is_symlink():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return path.stat().st_uid == os.getuid()
    except PermissionError:
        return False
    return False


def stale_folders(parent: Path, kind: str) -> list[Path]:
    try:
        return [entry for entry in parent.iterdir() if is_stale(entry, kind)]
    except OSError:
        return []


def remove_stale(parent: Path | None = None, kinds: tuple[str, ...] = (WORK, MEASURE)) -> None:
    """Delete what killed runs left in ``parent`` (default ``$TMPDIR``)."""
    folder = parent or Path(tempfile.gettempdir())
    for kind in kinds:
        for stale in stale_folders(folder, kind):
            shutil.rmtree(stale, ignore_errors=True)
