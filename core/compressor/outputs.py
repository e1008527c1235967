"""The output folder: refuse unsafe locations, stage writes, move them in atomically.

Nothing is written until :meth:`OutputFolder.prepare` is called, which core
does only after the model and data have been read and the request validated.
Artifacts stay in a private staging folder (where they are measured) until
:meth:`OutputFolder.publish` renames them into place at the end of a
successful run, so an interrupted or failed run leaves earlier outputs as they
were and no partial file under a final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from compressor import scratch
from compressor.errors import UsageError
from compressor.models import Artifact
from compressor.recipes import file_stem


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Let ``write`` fill a temporary file beside ``path``, then rename it over ``path``."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


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
        stem = file_stem(variant_name)
        folder = Path(tempfile.mkdtemp(prefix=f"{stem}-", dir=self._staging))
        return folder / stem

    def publish(self, artifacts: Sequence[Artifact], texts: dict[str, str]) -> None:
        """Rename staged artifacts into the output folder and write the reports.

        Each rename is atomic; names are checked for clashes first. A file that
        is replaced is kept in staging until the run ends, so an abort can put
        it back."""
        names = [path.name for artifact in artifacts for path in artifact.files] + list(texts)
        if len(set(names)) != len(names):
            raise UsageError(f"two outputs would share a file name: {sorted(names)}", self.path)
        for name in names:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                raise UsageError(f"--out holds a folder named {name!r}, where an output file goes", self.path)
        for artifact in artifacts:
            for staged in artifact.files:
                self._place(self.path / staged.name, lambda target, staged=staged: os.replace(staged, target))
        for name, text in texts.items():
            self._place(self.path / name, lambda target, text=text: atomic_write_text(target, text))

    def _place(self, target: Path, write: Callable[[Path], object]) -> None:
        assert self._staging is not None, "prepare() first"
        backup = None
        if target.exists() or target.is_symlink():
            backup = self._staging / f"replaced-{len(self._published)}-{target.name}"
            os.replace(target, backup)
        self._published.append((target, backup))
        write(target)

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
