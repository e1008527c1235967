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
whole process's peak, read as it finishes (for a variant timed against the original:
before the original's runtime is opened beside it, ``original`` in the request).
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
    from compressor.runtime import Runtime


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
    original = Artifact.from_json(request["original"]) if request.get("original") else None
    measured = _measure_by_runtime(host, artifact, data, settings, original)
    # Sizes last, as they always were (a variant timed against the original has them already):
    # their reads must not count in the runtime's peak RSS.
    once = not settings.timing_only  # a repeat measures the timings only
    sizes = size_metrics(artifact) if once and "size_bytes" not in measured.metrics else {}
    metrics: dict[str, Any] = {**sizes, **measured.metrics}
    kept = {f"{index}__{kind}": array for index, name in enumerate(measured.outputs)
            for kind, array in measured.kept.get(name, {}).items()}
    if kept:
        np.savez(exchange / "kept.npz", **kept)
    metrics["cpus"] = cpus
    if once:
        metrics["baseline_rss_bytes"] = baseline_rss
        metrics.setdefault("peak_rss_bytes", peak_rss_bytes())
        # Last, after every timing pass and the file sizes (before the original was opened beside
        # a variant, :func:`_against_original`): the whole process's peak.
        metrics.setdefault("measure_peak_rss_bytes", lifetime_peak_rss_bytes())
    result = {"metrics": metrics, "outputs": measured.outputs}
    (exchange / "result.json").write_text(json.dumps(result, default=float))


def _measure_by_runtime(host: PluginHost, artifact: Artifact, data: Dataset | None,
                        settings: MeasureSettings, original: Artifact | None = None) -> RuntimeMeasurement:
    """Open the backend's runtime (its framework imported before the clock starts) and let
    core measure it; with the ``original``'s artifact, time the two side by side after."""
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
        # Generation (issue 27): a causal LM with a key/value cache, measured generating.
        from compressor.generation import measure_generation
        try:
            measured.metrics.update(measure_generation(runtime, data, settings))
        except errors.UnsupportedError as error:
            if error.path is not None:
                raise
            raise errors.UnsupportedError(error.message, artifact.path) from None
        if original is not None:
            _against_original(opener, artifact, runtime, original, data, settings, measured)
    finally:
        runtime.close()
    if not settings.timing_only:
        measured.metrics["load_ms"] = load.ms
    measured.metrics["threads"] = settings.threads
    return measured


def _against_original(opener: Any, artifact: Artifact, runtime: Runtime, original: Artifact,
                      data: Dataset | None, settings: MeasureSettings, measured: RuntimeMeasurement) -> None:
    """The variant's batch-1 latency against the original's, both open in this process
    (:func:`compressor.engine.latency_against`). The sizes and the whole process's peak are
    read first: the original's memory is not the variant's. Where the original would not fit
    in memory beside it, or fails here, the ratio is left to the two p50s, with a note why."""
    from compressor.builtin import size_metrics
    from compressor.engine import latency_against

    metrics = measured.metrics
    if not settings.timing_only:
        metrics.update(size_metrics(artifact))
        metrics.setdefault("peak_rss_bytes", peak_rss_bytes())
        metrics["measure_peak_rss_bytes"] = lifetime_peak_rss_bytes()
    needed, available = 2 * _bytes_on_disk(original.files), _available_memory_bytes()
    if available is not None and needed > available:
        metrics["latency_ratio_note"] = (
            f"not timed side by side with the original: twice its files ({needed / 2**30:.1f} GiB) exceed "
            f"the memory available ({available / 2**30:.1f} GiB); the ratio of the two p50s, no interval")
        return
    try:
        opened = opener(artifact=original, settings=settings)
        if opened is None:
            raise errors.UnsupportedError("the backend opened no runtime for the original")
        try:
            metrics.update(latency_against(runtime, measured.first_example, opened, data, settings))
        finally:
            opened.close()
    except Exception as error:  # noqa: BLE001 - the variant's own figures stand without the comparison
        metrics["latency_ratio_note"] = (f"not timed side by side with the original ({errors.first_line(error)}); "
                                         "the ratio of the two p50s, no interval")


def _bytes_on_disk(paths: Sequence[Path]) -> int:
    total = 0
    for path in paths:
        if path.is_dir():
            total += sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
        elif path.exists():
            total += path.stat().st_size
    return total


def _available_memory_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (Linux); None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


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
