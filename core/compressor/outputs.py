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

from compressor.errors import UsageError
from compressor.models import Artifact


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
    """``--out DIR``: checked against the inputs, written through a staging folder."""

    def __init__(self, path: Path, inputs: Sequence[Path], force: bool = False) -> None:
        self.path = path.expanduser().absolute()
        self.inputs = [p.expanduser().absolute() for p in inputs]
        self.force = force
        self.created = False
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

    def publish(self, artifacts: Sequence[Artifact], texts: dict[str, str]) -> None:
        """Rename staged artifacts into the output folder and write the reports.

        Each rename is atomic; names are checked for clashes first."""
        names = [path.name for artifact in artifacts for path in artifact.files] + list(texts)
        if len(set(names)) != len(names):
            raise UsageError(f"two outputs would share a file name: {sorted(names)}", self.path)
        for artifact in artifacts:
            for staged in artifact.files:
                os.replace(staged, self.path / staged.name)
        for name, text in texts.items():
            atomic_write_text(self.path / name, text)

    def close(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def abort(self) -> None:
        """Undo this run: the staging folder, and the output folder if this run created it."""
        self.close()
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
