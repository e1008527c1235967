"""The output folder: refuse unsafe locations, stage writes, move them in atomically.

Nothing is written until :meth:`OutputFolder.prepare` is called, which core
does only after the model and data have been read and the request validated.
Artifacts stay in a private staging folder (where they are measured) until
:meth:`OutputFolder.publish` renames them into place at the end of a
successful run, so an interrupted or failed run leaves earlier outputs as they
were and no partial file under a final name.

Publishing is all or nothing: every file of the new set (reports and chart
included) is written and synced in staging before the first rename, so a full
disk changes nothing in ``--out``; and every name in ``--out`` is replaced by
renaming a fresh file over it, so a symlink or hard link planted there is never
written through.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from compressor import scratch
from compressor.errors import RESOURCE_ERRNOS, UsageError, os_problem
from compressor.models import Artifact
from compressor.recipes import file_stem, is_valid_name

#: The chart file a publish may add (see :meth:`OutputFolder.publish`).
CHART = "report.png"


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Let ``write`` fill a fresh temporary file beside ``path``, sync it, then rename it over
    ``path``: whatever was at ``path`` (a symlink, a hard link) is replaced, never written through."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        sync(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def sync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder and everything in it) to disk, so that a full disk
    shows now, as an error, rather than after the rename that publishes it."""
    if path.is_dir() and not path.is_symlink():
        for folder, _, files in os.walk(path):
            for name in files:
                _sync_one(Path(folder) / name)
            _sync_one(Path(folder))
        return
    _sync_one(path)


def _sync_one(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # folders on some filesystems
            raise
    finally:
        os.close(descriptor)


def _link_or_copy(source: Path, destination: Path) -> None:
    """``destination`` (a fresh name) with ``source``'s bytes: a hard link, or a copy where the
    filesystem has none."""
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        shutil.copyfile(source, destination, follow_symlinks=False)


def check_component(name: str, where: Path) -> None:
    """Refuse a name that is not one plain file name (a path, '..', empty, hidden)."""
    if (not name or name != Path(name).name or name in (".", "..") or name.startswith(".")
            or "\\" in name or "\0" in name):
        raise UsageError(f"refusing to write {name!r}: not a plain file name inside --out", where)


class OutputFolder:
    """``--out DIR``: checked against the inputs, written through a staging folder.

    The run owns only what it writes: an aborted run restores every file it
    replaced, removes every file it added and the folders it created (when
    empty), and leaves anything else in ``--out`` alone.
    """

    def __init__(self, path: Path, inputs: Sequence[Path], force: bool = False) -> None:
        self.path = path.expanduser().absolute()
        self.inputs = [p.expanduser().absolute() for p in inputs]
        self.force = force
        #: Folders this run created, outermost first.
        self.created: list[Path] = []
        self._staging: Path | None = None
        #: Published files, each with the staged backup of what it replaced (or None).
        self._published: list[tuple[Path, Path | None]] = []

    def check(self) -> None:
        """Refuse an output folder that overlaps an input or holds files (without --force)."""
        if self.path.is_symlink() and not self.path.exists():
            raise UsageError("--out is a symlink to nothing; remove it or choose another --out", self.path)
        resolved = self.path.resolve()
        for source in self.inputs:
            real = source.resolve()
            if resolved == real:
                raise UsageError("the output path is the input itself; choose another --out", self.path)
            if real.is_file() and resolved == real.parent:
                raise UsageError(
                    f"the output folder is the folder of the input {source.name}; choose another --out",
                    self.path,
                )
            if real.is_dir() and (resolved == real or real in resolved.parents):
                raise UsageError(
                    "the output folder is inside the input model folder; choose another --out",
                    self.path,
                )
        if self.path.exists() and not self.path.is_dir():
            raise UsageError("--out exists and is not a folder", self.path)
        if self.path.is_dir() and self._user_entries() and not self.force:
            raise UsageError(
                "--out exists and is not empty; pass --force to overwrite files in it", self.path
            )

    def _user_entries(self) -> list[Path]:
        """What is in ``--out`` besides staging folders that killed runs left behind."""
        try:
            entries = list(self.path.iterdir())
        except OSError as error:
            raise UsageError(f"cannot read --out ({error.strerror})", self.path) from None
        stale = set(scratch.stale_folders(self.path, scratch.STAGING))
        return [entry for entry in entries if entry not in stale]

    def prepare(self) -> None:
        self.check()
        missing = [folder for folder in (self.path, *self.path.parents) if not folder.exists()]
        try:
            for folder in reversed(missing):
                folder.mkdir()
                self.created.append(folder)
            scratch.remove_stale(self.path, (scratch.STAGING,))
            self._staging = scratch.make_folder(scratch.STAGING, self.path)
        except OSError as error:
            self._remove_created()
            raise UsageError(f"cannot write to --out ({error.strerror or error})", self.path) from None

    def staging_path(self, variant_name: str) -> Path:
        """A suffix-less path in a fresh private folder for a backend's save.

        Dots become underscores so ``destination.with_suffix(".onnx")`` keeps
        the whole name (``prune0.5-int8`` -> ``prune0_5-int8.onnx``)."""
        assert self._staging is not None, "prepare() first"
        if not is_valid_name(variant_name):
            raise UsageError(f"variant name {str(variant_name)[:60]!r} is not one plain file name", self.path)
        stem = file_stem(variant_name)
        folder = Path(tempfile.mkdtemp(prefix=f"{stem}-", dir=self._staging))
        return folder / stem

    def staging_folder(self, name: str) -> Path:
        """A path (not yet created) in the private staging folder, for a nested run's ``--out``."""
        assert self._staging is not None, "prepare() first"
        check_component(name, self.path)
        return Path(tempfile.mkdtemp(prefix="nested-", dir=self._staging)) / name

    def publish(self, artifacts: Sequence[Artifact], texts: Mapping[str, str], *,
                chart: Callable[[Path], bool] | None = None, copies: Mapping[str, Path] | None = None,
                trees: Mapping[str, Path] | None = None, stale: Sequence[str] = ()) -> list[str]:
        """Put the new results into ``--out``, all or nothing; returns the names published.

        First the whole set is made complete in staging: ``texts`` written, ``chart`` drawn
        (into the path it is given; False: no chart, and an old ``report.png`` goes), each of
        ``copies`` (``{"best.onnx": staged file}``) made as a fresh hard link or copy, the
        files of each of ``trees`` (``{"onnx": staged run folder}``) listed, and everything
        synced to disk. A full disk or any other failure up to here leaves ``--out``
        untouched. Only then is each name renamed into place (the entry it replaces, a
        symlink or hard link included, is moved aside, never written through), and the
        ``stale`` names this run owns are moved aside too; an abort puts all of it back."""
        assert self._staging is not None, "prepare() first"
        staged: dict[str, Path] = {}
        for artifact in artifacts:
            for path in artifact.files:
                self._add(staged, path.name, path)
        for name, root in (trees or {}).items():
            for path in sorted(root.rglob("*")):
                inside = path.relative_to(root)
                # Hidden entries are a nested run's scratch (staging, locks), not results.
                if (not path.is_dir() or path.is_symlink()) and not any(p.startswith(".") for p in inside.parts):
                    self._add(staged, f"{name}/{inside.as_posix()}", path)
        gone = list(stale)
        try:
            folder = Path(tempfile.mkdtemp(prefix="publish-", dir=self._staging))
            for name, text in texts.items():
                check_component(name, self.path)
                atomic_write_text(folder / name, text)
                self._add(staged, name, folder / name)
            for name, source in (copies or {}).items():
                check_component(name, self.path)
                _link_or_copy(source, folder / name)
                self._add(staged, name, folder / name)
            if chart is not None:
                if chart(folder / CHART):
                    self._add(staged, CHART, folder / CHART)
                else:
                    gone.append(CHART)
            for path in staged.values():
                sync(path)
            for parent in {path.parent for path in staged.values()}:
                _sync_one(parent)
        except OSError as error:
            if error.errno not in RESOURCE_ERRNOS:
                raise
            raise UsageError(f"cannot write the results: {os_problem(error)}; nothing in --out was changed",
                             self.path) from None
        self._commit(staged, [name for name in dict.fromkeys(gone) if name not in staged])
        return list(staged)

    def _add(self, staged: dict[str, Path], name: str, path: Path) -> None:
        for part in name.split("/"):
            check_component(part, self.path)
        if name in staged:
            raise UsageError(f"two outputs would share the file name {name!r}", self.path)
        target = self.path / name
        if target.is_dir() and not target.is_symlink():
            raise UsageError(f"--out holds a folder named {name!r}, where an output file goes", self.path)
        for folder in target.parents:
            if folder == self.path:
                break
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                raise UsageError(f"--out/{folder.relative_to(self.path)} is not a folder of this run's "
                                 "(a symlink or a file); remove it or choose another --out", self.path)
        staged[name] = path

    def _commit(self, staged: Mapping[str, Path], stale: Sequence[str]) -> None:
        try:
            for name in stale:
                target = self.path / name
                if target.is_symlink() or (target.exists() and not target.is_dir()):
                    self._move_aside(target)
            for name, source in staged.items():
                target = self.path / name
                self._make_parents(target)
                self._move_aside(target)
                os.replace(source, target)
            for folder in {(self.path / name).parent for name in staged}:
                _sync_one(folder)
        except OSError as error:
            raise UsageError(f"cannot move the results into --out: {os_problem(error)}; "
                             "its previous contents are put back", self.path) from None

    def _make_parents(self, target: Path) -> None:
        """The sub-folders of a tree's file (``--out/onnx``), recorded so an abort removes them."""
        missing = [folder for folder in target.parents if folder != self.path and self.path in folder.parents
                   and not folder.exists()]
        for folder in reversed(missing):
            folder.mkdir()
            self.created.append(folder)
        parent = target.parent
        if parent.is_symlink() or not parent.is_dir():
            raise UsageError(f"--out/{parent.relative_to(self.path)} is not a folder", self.path)

    def _move_aside(self, target: Path) -> None:
        """Whatever is at ``target`` (file, symlink, hard link) renamed into staging, never opened."""
        assert self._staging is not None
        backup = None
        if target.is_symlink() or target.exists():
            backup = self._staging / f"replaced-{len(self._published)}-{target.name}"
            os.replace(target, backup)
        self._published.append((target, backup))

    def close(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        self._published = []

    def abort(self) -> None:
        """Undo this run: put back what it replaced, remove what it added, the
        staging folder, and the folders it created if nothing else is in them."""
        for target, backup in reversed(self._published):
            try:
                if backup is not None:
                    os.replace(backup, target)
                else:
                    target.unlink(missing_ok=True)
            except OSError:
                pass
        self.close()
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:
                break
        self.created = []
