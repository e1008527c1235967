"""The output folder: refuse unsafe locations, stage writes, move them in atomically.

Nothing is written until :meth:`OutputFolder.prepare` is called, which core
does only after the model and data have been read and the request validated.
A failed run removes what it wrote (the whole folder if it created it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from compressor.errors import UsageError
from compressor.models import Artifact


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class OutputFolder:
    """``--out DIR``: checked against the inputs, written through a staging folder."""

    def __init__(self, path: Path, inputs: Sequence[Path], force: bool = False) -> None:
        self.path = path.expanduser().absolute()
        self.inputs = [p.expanduser().absolute() for p in inputs]
        self.force = force
        self.created = False
        self.written: list[Path] = []
        self._staging: Path | None = None

    def check(self) -> None:
        """Refuse an output folder that overlaps an input or holds files (without --force)."""
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
        if self.path.is_dir() and any(self.path.iterdir()) and not self.force:
            raise UsageError(
                "--out exists and is not empty; pass --force to overwrite files in it", self.path
            )

    def prepare(self) -> None:
        self.check()
        if not self.path.exists():
            self.path.mkdir(parents=True)
            self.created = True
        self._staging = Path(tempfile.mkdtemp(prefix=".compressor-staging-", dir=self.path))

    def staging_path(self, variant_name: str) -> Path:
        """A suffix-less path in a fresh private folder for a backend's save.

        Dots become underscores so ``destination.with_suffix(".onnx")`` keeps
        the whole name (``prune0.5-int8`` -> ``prune0_5-int8.onnx``)."""
        assert self._staging is not None, "prepare() first"
        stem = variant_name.replace(".", "_")
        folder = Path(tempfile.mkdtemp(prefix=f"{stem}-", dir=self._staging))
        return folder / stem

    def commit(self, artifact: Artifact) -> Artifact:
        """Move a staged artifact's files into the output folder (rename is atomic)."""
        moved = []
        for staged in artifact.files:
            final = self.path / staged.name
            os.replace(staged, final)
            self.written.append(final)
            moved.append(final)
        return Artifact(artifact.backend, moved[0], artifact.format, tuple(moved[1:]))

    def write_text(self, name: str, text: str) -> Path:
        target = self.path / name
        atomic_write_text(target, text)
        self.written.append(target)
        return target

    def close(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def abort(self) -> None:
        """Undo this run's writes: the whole folder if this run created it."""
        self.close()
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            for path in self.written:
                path.unlink(missing_ok=True)
