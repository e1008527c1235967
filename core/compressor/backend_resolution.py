"""Which backend reads a model: the one asked for, or the one whose plugin claims the file;
installed and not broken. A run resolves its backend once (:func:`compressor.session.checked_plan`)."""

from __future__ import annotations

import json
from pathlib import Path

from compressor.errors import UnsupportedError
from compressor.plugins import PluginHost
from compressor.specs import Backend


def resolve_backend(host: PluginHost, path: Path, requested: str | None) -> Backend:
    if requested is None:
        requested = host.identify(path)
        if requested is None:
            formats = "; ".join(
                f"{b.name}: {', '.join(b.formats)}" for b in host.backends().values()
            )
            raise UnsupportedError(
                f"no backend recognises this file; pass --backend (known formats: {formats})",
                path,
            )
    backend = host.backend(requested)
    missing = backend.missing_modules()
    if missing:
        raise UnsupportedError(
            f"backend {backend.name!r} needs {', '.join(missing)}; install it with: "
            f"{backend.install_hint()}"
        )
    broken = backend.broken_reason()
    if broken:
        raise UnsupportedError(f"backend {backend.name!r} is installed but broken: {broken}")
    return backend


def saved_as_hint(path: Path) -> str:
    """For a path named after a variant (``out/prune0.8-int8.tflite``) in a run's
    folder: where that variant's artifact really is."""
    report = path.parent / "report.json"
    try:
        variants = json.loads(report.read_text(encoding="utf-8")).get("variants", [])
    except (OSError, ValueError, AttributeError, RecursionError):
        return ""
    for variant in variants if isinstance(variants, list) else []:
        if not isinstance(variant, dict):
            continue
        name, artifact = variant.get("name"), variant.get("artifact")
        if isinstance(artifact, str) and name in (path.name, path.stem) and artifact != path.name:
            return f"; variant {name!r} of {report} is saved as {path.parent / artifact}"
    return ""
