"""A content-addressed cache across runs: artifacts and measurements, looked up by a key
made of everything they depend on (see :mod:`compressor.run_cache` for the keys).

Where: ``$COMPRESSOR_CACHE_DIR``, else ``$XDG_CACHE_HOME/compressor``, else
``~/.cache/compressor``. Off with ``COMPRESSOR_CACHE=off`` (or ``--no-cache`` on
``compressor run`` and ``compressor search``). Size: at most ``$COMPRESSOR_CACHE_MAX_BYTES`` (default 4 GiB); the
least recently used entries go first.

An entry is a folder ``entries/<key>/`` holding its files and ``entry.json`` (what
they are, with each file's size and SHA-256). It is written whole in a private
folder and renamed into place, so a reader sees a complete entry or none; a reader
checks every file's size and hash before trusting it, and an entry that fails (cut
short, edited, a symlink where a file should be) is removed and treated as a miss.
Nothing inside the cache folder is followed through a symlink.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.errors import UsageError

CACHE_DIR_VARIABLE, CACHE_SWITCH_VARIABLE = "COMPRESSOR_CACHE_DIR", "COMPRESSOR_CACHE"
MAX_BYTES_VARIABLE = "COMPRESSOR_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 4 << 30
#: Bumped when what an entry holds changes: older entries are then misses.
FORMAT = 1
ENTRY_FILE = "entry.json"
_OFF = ("0", "off", "no", "false")
#: ``--no-cache`` on ``compressor run`` or ``search`` (set for the process by the option's callback).
_disabled_by_flag = False


def disable(disabled: bool) -> None:
    """``--no-cache``: no lookups and no writes in this process."""
    global _disabled_by_flag
    _disabled_by_flag = disabled


def enabled() -> bool:
    return not _disabled_by_flag and os.environ.get(CACHE_SWITCH_VARIABLE, "").strip().lower() not in _OFF


def cache_root() -> Path:
    named = os.environ.get(CACHE_DIR_VARIABLE, "").strip()
    if named:
        return Path(named).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "compressor"


def max_bytes() -> int:
    text = os.environ.get(MAX_BYTES_VARIABLE, "").strip()
    if not text:
        return DEFAULT_MAX_BYTES
    try:
        value = int(float(text))
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(f"{MAX_BYTES_VARIABLE}={text!r} is not a number of bytes (0 keeps nothing)")
    return value


def check_settings() -> None:
    """The cache's environment variables, checked before any work (exit 2 naming the bad one)."""
    if enabled():
        max_bytes()


def key_of(parts: Mapping[str, Any]) -> str:
    """The SHA-256 of ``parts`` as canonical JSON (values that JSON lacks by their repr)."""
    text = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: Path, follow: bool = True) -> str:
    """SHA-256 of a file's bytes (``follow=False``: a symlink is refused, not read through)."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    digest = hashlib.sha256()
    descriptor = os.open(path, flags)
    with os.fdopen(descriptor, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def content_digest(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (relative names and contents, in order)."""
    if not path.is_dir():
        return file_digest(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + file_digest(file).encode())
    return digest.hexdigest()


@dataclass
class Hit:
    """An entry found and checked: its folder, and what ``entry.json`` says besides the files."""

    folder: Path
    payload: dict[str, Any]
    files: dict[str, Path]


class Cache:
    """The cache folder: :meth:`get` checked entries, :meth:`put` new ones atomically."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or cache_root()).absolute()
        self.entries = self.root / "entries"

    def _ready(self) -> bool:
        """The folder exists (made, private) and is a real folder, not a symlink."""
        try:
            for folder in (self.root, self.entries, self.root / "tmp"):
                folder.mkdir(mode=0o700, parents=folder is self.root, exist_ok=True)
                if not stat.S_ISDIR(os.lstat(folder).st_mode):
                    return False
        except OSError:
            return False
        return True

    def get(self, key: str) -> Hit | None:
        """The entry of ``key`` with every file checked against its recorded size and hash,
        or None (a missing, partial or altered entry: removed when it is there)."""
        folder = self.entries / key
        try:
            if not all(stat.S_ISDIR(os.lstat(path).st_mode) for path in (self.root, self.entries, folder)):
                return None
            record = json.loads(_read_plain(folder / ENTRY_FILE))
            files = {}
            for name, facts in record["files"].items():
                path = folder / name
                if Path(name).name != name or name.startswith(".") or name == ENTRY_FILE:
                    raise ValueError(name)
                if os.lstat(path).st_size != facts["size"] or file_digest(path, follow=False) != facts["sha256"]:
                    raise ValueError(name)
                files[name] = path
            os.utime(folder, follow_symlinks=False)  # used now: the last to be evicted
            return Hit(folder, record["payload"], files)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            self.remove(key)
            return None

    def put(self, key: str, payload: Mapping[str, Any], files: Mapping[str, Path]) -> bool:
        """Store ``files`` (name -> a path to copy) with ``payload``: written in a
        private folder, then renamed into place. False when it could not be (full disk,
        unwritable): a cache is never a reason for a run to fail."""
        try:
            if sum(os.stat(path).st_size for path in files.values()) > max_bytes() or not self._ready():
                return False  # it would be evicted at once (or there is no cache folder)
            staging = Path(tempfile.mkdtemp(prefix="put-", dir=self.root / "tmp"))
        except OSError:
            return False
        try:
            record: dict[str, Any] = {"files": {}, "payload": payload, "created": time.time()}
            for name, source in files.items():
                target = staging / name
                copy_file(source, target)
                record["files"][name] = {"size": os.lstat(target).st_size,
                                         "sha256": file_digest(target, follow=False)}
            (staging / ENTRY_FILE).write_text(json.dumps(record, default=repr), encoding="utf-8")
            try:
                os.rename(staging, self.entries / key)
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                return False  # another run stored it first
        except (OSError, TypeError, ValueError):
            return False
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.evict()
        return True

    def remove(self, key: str) -> None:
        """An entry moved out of ``entries/`` first (readers stop seeing it), then deleted."""
        folder = self.entries / key
        try:
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                os.unlink(folder)
                return
            doomed = Path(tempfile.mkdtemp(prefix="gone-", dir=self.root / "tmp"))
            os.rename(folder, doomed / key)
        except OSError:
            return
        shutil.rmtree(doomed, ignore_errors=True)

    def listing(self) -> list[tuple[str, int, float]]:
        """Every entry: its key, bytes, and when it was last used."""
        found = []
        try:
            names = os.listdir(self.entries)
        except OSError:
            return []
        for name in names:
            folder = self.entries / name
            try:
                info = os.lstat(folder)
                if not stat.S_ISDIR(info.st_mode):
                    continue
                size = sum(os.lstat(folder / file).st_size for file in os.listdir(folder))
            except OSError:
                continue
            found.append((name, size, info.st_mtime))
        return found

    def evict(self, limit: int | None = None) -> int:
        """Least recently used entries removed until the cache holds at most ``limit`` bytes
        (default :func:`max_bytes`); the bytes freed."""
        limit = max_bytes() if limit is None else limit
        entries = sorted(self.listing(), key=lambda entry: entry[2])
        total, freed = sum(size for _, size, _ in entries), 0
        for key, size, _ in entries:
            if total <= limit:
                break
            self.remove(key)
            total, freed = total - size, freed + size
        return freed

    def clear(self) -> int:
        return self.evict(0)


def _read_plain(path: Path) -> str:
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(descriptor, encoding="utf-8") as stream:
        return stream.read()


def copy_file(source: Path, target: Path) -> None:
    """``target`` (a fresh name) with ``source``'s bytes, copied (in the kernel), never a hard
    link: onnx refuses to load external data with more than one link (a hardlink attack, to
    its checker), and a published file must not share its bytes with the cache."""
    shutil.copyfile(source, target, follow_symlinks=False)
