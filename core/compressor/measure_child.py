"""The measuring process: ``python -P -c ... compressor.measure_child FOLDER``.

It loads only the plugin of the artifact's backend (plus in-process plugin
modules the parent registered), reads the evaluation data, and measures: with
the backend's :class:`~compressor.runtime.Runtime` when it offers one (core's
:mod:`compressor.engine` does the rest), else with the backend's own
``compressor_measure``. Generic measurers (file sizes) run in both cases.
Results go back as files in FOLDER: ``result.json``, ``kept.npz`` and, for
backends that measure themselves, ``predictions.npy`` / ``outputs.npy``.
``measure_peak_rss_bytes`` is the whole process's peak, read as it finishes.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compressor import errors
from compressor.memory import lifetime_peak_rss_bytes, peak_rss_bytes
from compressor.models import Artifact, Measurement, MeasureSettings, TensorSpec


def without_address_randomization() -> None:
    """In the child before exec: turn off ASLR for the measuring process (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        current = libc.personality(0xFFFFFFFF)
        if current != -1:
            libc.personality(current | _ADDR_NO_RANDOMIZE)
    except (OSError, AttributeError):
        pass


_ADDR_NO_RANDOMIZE = 0x0040000


def pin_to_cpus(threads: int) -> list[int]:
    """Pin this process to the last ``threads`` CPUs it may use, so repeats do
    not migrate between cores (a large source of run-to-run spread)."""
    if not hasattr(os, "sched_setaffinity"):
        return []
    available = sorted(os.sched_getaffinity(0))
    chosen = available[-threads:] if threads <= len(available) else available
    os.sched_setaffinity(0, chosen)
    return chosen


def _merge(measurements: list[Measurement | None]) -> Measurement:
    merged = Measurement()
    for measurement in measurements:
        if measurement is None:
            continue
        merged.metrics.update(measurement.metrics)
        if measurement.predictions is not None:
            merged.predictions = measurement.predictions
        if measurement.outputs is not None:
            merged.outputs = measurement.outputs
    return merged


def _run(exchange: Path) -> None:
    import importlib

    import numpy as np

    from compressor.plugins import PluginHost

    request = json.loads((exchange / "request.json").read_text())
    settings = MeasureSettings.from_json(request["settings"])
    cpus = pin_to_cpus(settings.threads)
    host = PluginHost(only=[request["plugin"]] if request.get("plugin") else None)
    for module_name in request["plugin_modules"]:
        module = importlib.import_module(module_name)
        if host.manager.get_plugin(module_name) is None and not host.manager.is_registered(module):
            host.register(module, name=module_name)
    artifact = Artifact.from_json(request["artifact"])
    inputs = tuple(TensorSpec.from_json(spec) for spec in request["inputs"])
    baseline_rss = peak_rss_bytes()
    data = None
    if request["data"]:
        data = host.hook_for(artifact.backend, "compressor_load_data")(
            path=Path(request["data"]), purpose="eval", inputs=inputs, backend=artifact.backend,
            limit=settings.max_examples, model_path=None, context=None,
        )
    by_runtime = _measure_by_runtime(host, artifact, data, settings)
    owner = host.backend(artifact.backend).plugin_name
    if by_runtime is None:
        measured = _merge(host.hook_for(artifact.backend, "compressor_measure")(
            artifact=artifact, data=data, settings=settings
        ))
        info: dict[str, Any] = {}
    else:
        # The backend measured through its runtime; only generic measurers add to it.
        others = [plugin for plugin in [host.manager.get_plugin(owner)] if plugin is not None]
        generic = host.manager.subset_hook_caller("compressor_measure", others)
        hooks = host.hook_for(artifact.backend, "compressor_measure") if not others else generic
        measured = _merge(hooks(artifact=artifact, data=data, settings=settings))
        measured.metrics.update(by_runtime.metrics)
        info = by_runtime.outputs
        kept = {f"{index}__{kind}": array for index, name in enumerate(info)
                for kind, array in by_runtime.kept.get(name, {}).items()}
        if kept:
            np.savez(exchange / "kept.npz", **kept)
    measured.metrics["baseline_rss_bytes"] = baseline_rss
    measured.metrics["cpus"] = cpus
    measured.metrics.setdefault("peak_rss_bytes", peak_rss_bytes())
    if measured.predictions is not None:
        np.save(exchange / "predictions.npy", np.asarray(measured.predictions), allow_pickle=False)
    if measured.outputs is not None:
        np.save(exchange / "outputs.npy", np.asarray(measured.outputs), allow_pickle=False)
    # Last, after every timing pass and the file sizes: the whole process's peak.
    measured.metrics["measure_peak_rss_bytes"] = lifetime_peak_rss_bytes()
    result = {"metrics": measured.metrics, "outputs": info}
    (exchange / "result.json").write_text(json.dumps(result, default=float))


def _measure_by_runtime(host: Any, artifact: Artifact, data: Any, settings: MeasureSettings) -> Any:
    """Open the backend's runtime (its framework imported before the clock starts) and let
    core measure it; None when the backend offers no runtime."""
    import importlib

    from compressor.engine import measure_runtime
    from compressor.measuring import Stopwatch

    opener = host.hook_for(artifact.backend, "compressor_open_runtime")
    if not opener.get_hookimpls():
        return None
    for module in host.backend(artifact.backend).runtime_imports:
        importlib.import_module(module)
    with Stopwatch() as load:
        runtime = opener(artifact=artifact, settings=settings)
    if runtime is None:
        return None
    try:
        measured = measure_runtime(runtime, data, settings)
    finally:
        runtime.close()
    measured.metrics["load_ms"] = load.ms
    measured.metrics["threads"] = settings.threads
    return measured


#: The exit status of a measuring process that could not write its results into its
#: scratch folder ($TMPDIR full or read-only): the parent reports that, not a crash.
SCRATCH_FAILED = 75


def main(argv: Sequence[str]) -> int:
    exchange = Path(argv[0])
    try:
        try:
            _run(exchange)
        except errors.CompressorError as error:
            _report(exchange, type(error).__name__, error.message, str(error.path) if error.path else None)
        except ModuleNotFoundError as error:
            _report(exchange, "UnsupportedError", f"missing module {error.name!r}")
        except OSError as error:
            if error.errno in errors.RESOURCE_ERRNOS and _in_folder(error, exchange):
                raise
            _report_unexpected(exchange, error)
        except Exception as error:  # noqa: BLE001 - reported to the parent, traceback on stderr
            _report_unexpected(exchange, error)
    except OSError as error:
        if error.errno not in errors.RESOURCE_ERRNOS:
            raise
        print(errors.os_problem(error), file=sys.stderr)
        return SCRATCH_FAILED
    return 0


def _in_folder(error: OSError, folder: Path) -> bool:
    return error.filename is None or str(error.filename).startswith(str(folder))


def _report(exchange: Path, kind: str, message: str, path: str | None = None) -> None:
    failure = {"type": kind, "message": message, "path": path}
    (exchange / "result.json").write_text(json.dumps({"error": failure}))


def _report_unexpected(exchange: Path, error: Exception) -> None:
    import traceback

    traceback.print_exc()
    _report(exchange, "CompressorError", f"measuring failed: {type(error).__name__}: {error}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
