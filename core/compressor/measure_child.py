"""The measuring process: ``python -P -c ... compressor.measure_child FOLDER``.

It loads only the plugin of the artifact's backend (plus in-process plugin
modules the parent registered), reads the evaluation data, opens the artifact
with the backend's :class:`~compressor.runtime.Runtime` and measures it
(:mod:`compressor.engine`); core measures the file sizes itself
(:func:`compressor.builtin.size_metrics`). That is the one way every backend is
measured: a backend without a runtime cannot be (``compressor_measure`` is
deprecated and no longer called). Results go back as files in FOLDER:
``result.json`` (metrics and each output's task) and ``kept.npz`` (what the
comparison needs of each output), read back as one
:class:`~compressor.worker.MeasuredArtifact`. ``measure_peak_rss_bytes`` is the
whole process's peak, read as it finishes.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compressor import errors
from compressor.memory import lifetime_peak_rss_bytes, peak_rss_bytes
from compressor.models import Artifact, Dataset, MeasureSettings, TensorSpec

if TYPE_CHECKING:
    from compressor.engine import RuntimeMeasurement
    from compressor.plugins import PluginHost


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


def _run(exchange: Path) -> None:
    import importlib

    import numpy as np

    from compressor.builtin import size_metrics
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
    measured = _measure_by_runtime(host, artifact, data, settings)
    # Sizes last, as they always were: their reads must not count in the runtime's peak RSS.
    metrics: dict[str, Any] = {**size_metrics(artifact), **measured.metrics}
    kept = {f"{index}__{kind}": array for index, name in enumerate(measured.outputs)
            for kind, array in measured.kept.get(name, {}).items()}
    if kept:
        np.savez(exchange / "kept.npz", **kept)
    metrics["baseline_rss_bytes"] = baseline_rss
    metrics["cpus"] = cpus
    metrics.setdefault("peak_rss_bytes", peak_rss_bytes())
    # Last, after every timing pass and the file sizes: the whole process's peak.
    metrics["measure_peak_rss_bytes"] = lifetime_peak_rss_bytes()
    result = {"metrics": metrics, "outputs": measured.outputs}
    (exchange / "result.json").write_text(json.dumps(result, default=float))


def _measure_by_runtime(host: PluginHost, artifact: Artifact, data: Dataset | None,
                        settings: MeasureSettings) -> RuntimeMeasurement:
    """Open the backend's runtime (its framework imported before the clock starts) and let
    core measure it."""
    import importlib

    from compressor.engine import measure_runtime
    from compressor.measuring import Stopwatch

    backend = host.backend(artifact.backend)
    opener = host.hook_for(artifact.backend, "compressor_open_runtime")
    if not opener.get_hookimpls():
        raise errors.UnsupportedError(
            f"backend {backend.name!r} (plugin {backend.plugin_name!r}) cannot be measured: it opens no "
            "runtime (implement compressor_open_runtime; compressor_measure is deprecated and no longer "
            "called, see docs/writing-a-plugin.md)")
    for module in backend.runtime_imports:
        importlib.import_module(module)
    with Stopwatch() as load:
        runtime = opener(artifact=artifact, settings=settings)
    if runtime is None:
        raise errors.UnsupportedError(f"backend {backend.name!r} opened no runtime for this artifact "
                                      "(compressor_open_runtime returned None)", artifact.path)
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
            if error.__cause__ is not None:  # a plugin's own exception: its traceback for --debug
                import traceback

                traceback.print_exception(error)
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
