"""What a run takes from the cache across runs (:mod:`compressor.cache`), and gives to it.

A variant's artifact is keyed by everything that makes it: the model's bytes (as given,
and the original's artifact: what the backend read, side files included), the
backend with its plugin's and frameworks' versions and compressor's, the source files
of compressor and the plugin (names, sizes, times: edited code is another key), the backend
options, ``--trust``, the training and calibration data's bytes, the variant's name
(file names inside an artifact follow it) and each step with its resolved parameters.
A measurement is keyed by the artifact's bytes (its files' SHA-256), the original it is
compared with, the evaluation data's bytes, the measuring settings and repeats, and the
machine (CPU model, CPU count, the CPUs this process may use): one taken elsewhere is
never reused, and one that a Ray worker took is kept only when that worker's machine is
this one. Whether the variant was timed side by side with the original (``compressor run``
with ``--precision``) or alone (``compressor search``, Ray) is part of the key: the two
report different figures. Only single-repeat measurements are kept (a run with
``--repeats`` keeps just each variant's first measurement in memory).

``compressor run``, ``compressor search`` and Ray runs share one key for the same thing:
a search trial that ``run`` made already (same name and steps) is restored, not made.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from compressor import cache, environment
from compressor.models import Artifact, MeasureSettings
from compressor.plugins import PluginHost
from compressor.recipes import ORIGINAL, Variant
from compressor.report import VariantResult
from compressor.run_request import RunRequest
from compressor.specs import Backend
from compressor.step_tree import step_key
from compressor.version import __version__
from compressor.worker import MeasuredArtifact


def machine() -> dict[str, Any]:
    """What a latency figure depends on besides the settings: the CPU and what this process may use."""
    cpu = environment.cpu_info()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    return {"cpu": cpu["model"], "cores": cpu["cores"], "usable_cpus": usable, "flags": cpu["flags"],
            "arch": platform.machine()}


def code_fingerprint(modules: Sequence[str]) -> str:
    """The source files of the packages ``modules`` belong to (names, sizes, modification
    times): code edited in a source checkout is another key, even under the same version."""
    import hashlib

    digest = hashlib.sha256()
    for top in sorted({name.split(".")[0] for name in modules}):
        module = sys.modules.get(top)
        roots = [Path(folder) for folder in getattr(module, "__path__", [])] or \
            ([Path(module.__file__)] if module is not None and getattr(module, "__file__", None) else [])
        for root in roots:
            files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
            for file in files:
                try:
                    info = file.stat()
                except OSError:
                    continue
                digest.update(f"{top}/{file.relative_to(root.parent)}\0{info.st_size}\0{info.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def machine_words(facts: dict[str, Any]) -> str:
    return f"{facts['cpu']}, {facts['usable_cpus']} of {facts['cores']} CPUs"


#: Metrics of where on a Ray cluster a measurement ran, true of that run only: not kept.
PLACEMENT_METRICS = ("node", "cpu_model", "measured_between")


def plugin_identity(host: PluginHost, plugin_name: str) -> str:
    """The backend plugin's module, name and distribution's version (a cached artifact is its work)."""
    for info in host.plugins():
        if info.name == plugin_name:
            return f"{info.module} {plugin_name} {info.distribution} {info.version}"
    return f"{plugin_name} {plugin_name}"


class RunCache:
    """One run's view of the cache: keys made once, variants restored and stored."""

    def __init__(self, request: RunRequest, backend: Backend, options: dict[str, Any], plugin: str,
                 original: Artifact) -> None:
        self.store = cache.Cache()
        self.request = request
        digest = cache.content_digest
        self.base = {
            "compressor": __version__, "backend": backend.name, "plugin": plugin,
            "code": code_fingerprint(["compressor", "compressor_frontends", plugin.split()[0]]),
            "versions": environment.versions(backend.distributions),
            # The model as given, and as the backend read it: the original's artifact holds what
            # the model file names elsewhere (an ONNX model's external data, say).
            "model": digest(request.model), "original": {path.name: digest(path) for path in original.files},
            "options": options, "trust": request.trust,
            "train": digest(request.train_data) if request.train_data else None,
            "calibration": digest(request.calibration_data) if request.calibration_data else None,
        }
        self.machine = machine()
        self._eval = digest(request.data) if request.data else None
        #: Variant name -> the SHA-256 of its artifact's files (restored or stored in this run).
        self.digests: dict[str, dict[str, str]] = {ORIGINAL: self.base["original"]}
        #: What this run took from the cache: artifacts restored, measurements reused.
        self.reused = {"artifacts": 0, "measurements": 0}

    def variant_key(self, variant: Variant) -> str:
        return cache.key_of({"kind": "variant", **self.base, "name": variant.name,
                             "steps": [step_key(step) for step in variant.steps]})

    def restore(self, variant: Variant, destination: Callable[[], Path]) -> tuple[VariantResult, Artifact] | None:
        """``variant`` from an earlier run: its files copied into the folder of the
        path ``destination()`` gives and its result as it was then, with a ``cached`` note;
        None on a miss."""
        hit = self.store.get(self.variant_key(variant))
        if hit is None:
            return None
        payload = hit.payload
        try:
            folder = destination().parent
            for name, path in hit.files.items():
                cache.copy_file(path, folder / name)
            facts = payload["artifact"]
            artifact = Artifact(facts["backend"], folder / facts["path"], facts["format"],
                                tuple(folder / name for name in facts["side_files"]), facts["metadata"],
                                tuple(facts["notes"]))
            result = VariantResult(variant.name, [str(step) for step in variant.steps], artifact.path.name,
                                   dict(payload["metrics"]), list(payload["notes"]), dict(payload["metadata"]))
        except (OSError, KeyError, TypeError):
            return None
        self.digests[variant.name] = {name: record for name, record in payload["digests"].items()}
        self.reused["artifacts"] += 1
        result.notes.append("cached: made in an earlier run with the same model, steps, data and versions")
        return result, artifact

    def keep(self, variant: Variant, result: VariantResult, artifact: Artifact) -> None:
        """A variant made in this run, stored for the next (unless it failed)."""
        if result.error is not None or len({path.parent for path in artifact.files}) != 1:
            return
        files = {path.name: path for path in artifact.files}
        try:
            digests = {name: cache.file_digest(path, follow=False) for name, path in files.items()}
        except OSError:
            return
        payload = {
            "artifact": {"backend": artifact.backend, "path": artifact.path.name, "format": artifact.format,
                         "side_files": [path.name for path in artifact.side_files],
                         "metadata": dict(artifact.metadata), "notes": list(artifact.notes)},
            "metrics": result.metrics, "notes": result.notes, "metadata": result.metadata, "digests": digests,
        }
        if self.store.put(self.variant_key(variant), _json_safe(payload), files):
            self.digests[variant.name] = digests

    def _measure_key(self, name: str, settings: MeasureSettings | None, side_by_side: bool | None) -> str | None:
        """The key of variant ``name``'s measurement with ``settings`` (default: the request's),
        timed ``side_by_side`` with the original or alone (default: as ``compressor run``
        measures here, a variant beside the original when ``--precision`` asks for it)."""
        digests = self.digests.get(name)
        if digests is None:
            return None
        request = self.request
        settings = request.measure if settings is None else settings
        if side_by_side is None:
            side_by_side = name != ORIGINAL and settings.precision > 0
        return cache.key_of({"kind": "measurement", "artifact": digests, "original": self.base, "eval": self._eval,
                             "measure": settings.to_json(), "repeats": request.repeats,
                             "side_by_side": side_by_side, "machine": self.machine})

    def measured(self, name: str, settings: MeasureSettings | None = None,
                 side_by_side: bool | None = None) -> MeasuredArtifact | None:
        """The earlier measurement of variant ``name``'s artifact on this machine, or None
        (``settings`` and ``side_by_side`` as for its key, :meth:`_measure_key`)."""
        import numpy as np

        key = self._measure_key(name, settings, side_by_side)
        hit = self.store.get(key) if key is not None and self.request.repeats == 1 else None
        if hit is None:
            return None
        try:
            kept: dict[str, dict[str, Any]] = {}
            if "kept.npz" in hit.files:
                with np.load(hit.files["kept.npz"], allow_pickle=False) as arrays:
                    for output, kind, array_name in hit.payload["kept"]:
                        kept.setdefault(output, {})[kind] = arrays[array_name]
            found = MeasuredArtifact(dict(hit.payload["metrics"]), dict(hit.payload["output_info"]), kept)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        self.reused["measurements"] += 1
        return found

    def keep_measured(self, name: str, measured: MeasuredArtifact, scratch: Path,
                      settings: MeasureSettings | None = None, side_by_side: bool | None = None) -> bool:
        """Variant ``name``'s measurement stored for the next run on this machine: not when
        it was taken on another (a Ray worker elsewhere: ``measured.machine`` differs).
        Whether it was stored."""
        import numpy as np

        key = self._measure_key(name, settings, side_by_side)
        if key is None or self.request.repeats != 1 or measured.machine not in (None, self.machine):
            return False
        index, arrays = [], {}
        for output, kinds in measured.kept.items():
            for kind, array in kinds.items():
                if not isinstance(array, np.ndarray) or array.dtype.hasobject:
                    return False
                name_in_file = f"a{len(arrays)}"
                index.append([output, kind, name_in_file])
                arrays[name_in_file] = array
        files = {}
        if arrays:
            path = scratch / f"kept-{key}.npz"
            np.savez(path, **arrays)
            files["kept.npz"] = path
        metrics = {key: value for key, value in measured.metrics.items() if key not in PLACEMENT_METRICS}
        payload = {"metrics": metrics, "output_info": measured.output_info, "kept": index,
                   "machine": self.machine}
        try:
            return self.store.put(key, _json_safe(payload), files)
        finally:
            for path in files.values():
                path.unlink(missing_ok=True)


def _json_safe(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` as it reads back from JSON (tuples as lists), so a hit equals what was stored."""
    return json.loads(json.dumps(payload, default=repr))


def open_cache(request: RunRequest, backend: Backend, options: dict[str, Any], plugin: str,
               variants: Sequence[Variant], original: Artifact | None) -> RunCache | None:
    """The run's cache, or None: switched off, nothing to look up, or unreadable inputs."""
    if not variants:
        return None
    return open_any(request, backend, options, plugin, original)


def open_any(request: RunRequest, backend: Backend, options: dict[str, Any], plugin: str,
             original: Artifact | None) -> RunCache | None:
    """The cache of a run, a search or a Ray run, or None: switched off, or unreadable inputs."""
    if not cache.enabled() or original is None:
        return None
    try:
        return RunCache(request, backend, options, plugin, original)
    except OSError:
        return None


def cached_note(run_cache: RunCache) -> str:
    return f"cached: measured in an earlier run on this machine ({machine_words(run_cache.machine)})"
