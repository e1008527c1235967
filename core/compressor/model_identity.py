"""Which model a run was of, so ``compressor compare`` can tell runs of different models apart.

A run's original records ``metadata["model_file"]``: the model's file (or folder) name,
its bytes, a fingerprint and the inputs as loaded. The fingerprint is a SHA-256 of each
file's relative name, size, first and last MiB: cheap for a model of any size, and two
different models (other weights, other architecture) practically never share one; it is
not a hash of every byte. ``compare`` warns when the runs' originals differ.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compressor.models import TensorSpec
from compressor.results import ReportData, human_bytes

#: Bytes read from each end of every file.
EDGE = 1 << 20
#: Files of a model folder fingerprinted at most (the rest named only by their count).
MAX_FILES = 10_000


def model_file(path: Path, inputs: Sequence[TensorSpec] = ()) -> dict[str, Any]:
    """The identity of the model at ``path``: name, bytes, fingerprint, inputs."""
    files = _files(path)
    digest = hashlib.sha256()
    total = 0
    for relative, file in files[:MAX_FILES]:
        try:
            with open(file, "rb", opener=_no_follow) as stream:
                size = os.fstat(stream.fileno()).st_size
                digest.update(f"{relative}\0{size}\0".encode("utf-8", "surrogatepass"))
                digest.update(stream.read(EDGE))
                if size > 2 * EDGE:
                    stream.seek(size - EDGE)
                    digest.update(stream.read(EDGE))
        except OSError:
            continue
        total += size
    digest.update(str(len(files)).encode())
    return {"name": path.name, "bytes": total, "fingerprint": digest.hexdigest()[:32],
            "inputs": [_spec(spec) for spec in inputs]}


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))


def _files(path: Path) -> list[tuple[str, Path]]:
    if not path.is_dir():
        return [(path.name, path)]
    found = []
    for folder, names, files in os.walk(path):  # symlinked folders are not followed
        names.sort()
        for name in sorted(files):
            file = Path(folder) / name
            if file.is_file() and not file.is_symlink():
                found.append((str(file.relative_to(path)), file))
    return found


def _spec(spec: TensorSpec) -> dict[str, Any]:
    shape = getattr(spec, "shape", None)
    return {"name": getattr(spec, "name", str(spec)), "dtype": str(getattr(spec, "dtype", "")),
            "shape": list(shape) if shape is not None else None}


def different_models(reports: Sequence[ReportData]) -> str | None:
    """Why the runs' originals look like different models (None: the same, or cannot tell):
    their fingerprints differ, or (older reports without one) their file names do."""
    identities = []
    for report in reports:
        original = report.variants[0] if report.variants else None
        recorded = original.metadata.get("model_file") if original is not None else None
        identities.append((report, recorded if isinstance(recorded, dict) else None))
    fingerprints = {identity.get("fingerprint") for _, identity in identities if identity}
    if all(identity for _, identity in identities):
        if len(fingerprints) <= 1:
            return None
        described = ", ".join(_described(report, identity) for report, identity in identities)
        return f"the runs' originals are different models ({described})"
    names = {Path(report.model).name for report in reports}
    if len(names) > 1:
        return f"the runs' originals are different model files ({', '.join(sorted(names))})"
    return None


def _described(report: ReportData, identity: dict[str, Any]) -> str:
    inputs = ", ".join(f"{spec.get('name')} {spec.get('shape')}" for spec in identity.get("inputs") or [])
    return f"{identity.get('name') or Path(report.model).name}: {human_bytes(identity.get('bytes'))}" + (
        f", inputs {inputs}" if inputs else "")


def warning(reports: Sequence[ReportData]) -> str | None:
    """The sentence ``compare`` prints and notes when the originals differ."""
    reason = different_models(reports)
    if reason is None:
        return None
    return (f"{reason}: \"smaller\" compares every variant with the first run's original, which means "
            "something only if they are one model in other formats (agreement stays against each run's own)")
