"""Refuse a run early when its artifacts would not fit on disk.

A run writes the converted original plus one artifact per variant into
``--out`` (through staging on the same filesystem), and scratch files (an
exported graph, quantizer inputs) into ``$TMPDIR``. Each artifact is estimated
from the input's size and its steps: the smallest share of the input that one of
its steps leaves, as its technique declares (``Technique.size_factor``: quantizing
to N bits keeps about N/32 of fp32 weights); a technique declaring none is assumed
not to shrink. The estimate errs on the large side; ``--no-space-check`` skips it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from compressor.declarations import size_factor
from compressor.errors import UsageError
from compressor.recipes import Variant
from compressor.specs import Technique

#: Room left over for reports, logs and the filesystem's own needs.
_MARGIN_BYTES = 64 << 20


def input_bytes(path: Path) -> int:
    """Bytes of a model file, or of every file in a model folder (symlinks not followed)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            entry = Path(folder) / name
            if not entry.is_symlink():
                total += entry.stat().st_size
    return total


def estimated_artifact_bytes(source_bytes: int, variant: Variant,
                             techniques: Mapping[str, Technique] | None = None) -> int:
    """Bytes of ``variant``'s artifact, from the declarations of its backend's ``techniques``
    (else of the installed backends: :func:`compressor.declarations.size_factor`)."""
    kept = min((size_factor(step, techniques) for step in variant.steps), default=1.0)
    return int(source_bytes * min(kept, 1.0))


def check_free_space(model: Path, variants: Sequence[Variant], out: Path, scratch: Path,
                     source_bytes: int | None = None, techniques: Mapping[str, Technique] | None = None) -> None:
    """Raise :class:`UsageError` when ``--out`` or ``$TMPDIR`` lacks room for the run.
    ``source_bytes``: the loaded model's size with side files, when the backend knows it;
    ``techniques``: the backend's, which size its steps."""
    source = max(input_bytes(model), source_bytes or 0)
    needed_out = source + sum(estimated_artifact_bytes(source, v, techniques) for v in variants) + _MARGIN_BYTES
    needed_scratch = source + _MARGIN_BYTES
    out_device = _existing(out)
    scratch_device = _existing(scratch)
    if os.stat(out_device).st_dev == os.stat(scratch_device).st_dev:
        needed_out += needed_scratch
        needed_scratch = 0
    for folder, needed, what in ((out_device, needed_out, f"the original and {len(variants)} variant(s)"),
                                 (scratch_device, needed_scratch, "scratch files")):
        free = shutil.disk_usage(folder).free
        if needed > free:
            raise UsageError(
                f"not enough free disk space: {what} need about {_gb(needed)}, {_gb(free)} free "
                f"in {folder}; free some space, choose another --out or TMPDIR, or pass --no-space-check",
                out,
            )


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (``--out`` may not exist yet)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def _gb(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.0f} MB"
