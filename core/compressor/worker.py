"""Measure one artifact in a fresh subprocess.

The parent (:func:`measure_isolated`) writes a request into a temporary folder
and runs ``python -m compressor.worker FOLDER``. The child loads the plugins,
reads the evaluation data, calls every ``compressor_measure`` implementation
and writes back metrics, predictions and outputs, with its own peak RSS from the
kernel (``VmHWM``), so native allocations of ONNX Runtime or TensorFlow count.
A runtime that aborts becomes a clean error in the parent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor import errors, scratch
from compressor.children import child_environment, python_command
from compressor.memory import peak_rss_bytes
from compressor.models import Artifact, Measurement, MeasureSettings, TensorSpec

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass
class IsolatedResult:
    metrics: dict[str, Any]
    predictions: Any | None
    outputs: Any | None


def measure_isolated(
    artifact: Artifact,
    data_path: Path | None,
    inputs: Sequence[TensorSpec],
    settings: MeasureSettings,
    plugin_modules: Sequence[str] = (),
) -> IsolatedResult:
    """Measure ``artifact`` in a child process and return what it found."""
    import numpy as np

    with scratch.scratch_folder(scratch.MEASURE) as exchange:
        request = {
            "artifact": artifact.to_json(),
            "data": str(data_path) if data_path else None,
            "inputs": [spec.to_json() for spec in inputs],
            "settings": settings.to_json(),
            "plugin_modules": list(plugin_modules),
        }
        (exchange / "request.json").write_text(json.dumps(request))
        environment = child_environment({name: str(settings.threads) for name in _THREAD_VARIABLES})
        environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # The same hash seed and address layout in every repeat: per-process
        # layout luck otherwise moves microsecond latencies by tens of percent.
        environment["PYTHONHASHSEED"] = "0"
        started = time.perf_counter()
        with open(exchange / "stderr.txt", "wb") as stderr:
            process = subprocess.Popen(
                python_command("compressor.worker", [str(exchange)]),
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                env=environment,
                preexec_fn=_without_address_randomization,
            )
            try:
                _, status, usage = os.wait4(process.pid, 0)
            except BaseException:
                # Interrupted (Ctrl-C, SIGTERM): the child must not outlive the run.
                process.kill()
                process.wait()
                raise
            process.returncode = os.waitstatus_to_exitcode(status)
        wall_seconds = time.perf_counter() - started
        result_file = exchange / "result.json"
        child_output = (exchange / "stderr.txt").read_text(errors="replace").strip()
        if not result_file.exists():
            tail = child_output.splitlines()[-3:]
            error: errors.CompressorError = errors.InvalidInputError(
                f"the runtime crashed while measuring (exit {process.returncode})"
                + (f": {' | '.join(tail)}" if tail else ""),
                artifact.path,
            )
            error.child_output = child_output
            raise error
        result = json.loads(result_file.read_text())
        if "error" in result:
            failure = result["error"]
            error_class = getattr(errors, failure["type"], errors.CompressorError)
            error = error_class(failure["message"], failure.get("path"))
            error.child_output = child_output
            raise error
        metrics = result["metrics"]
        # The child's own high-water mark when it could read it: ru_maxrss of a
        # forked child starts from the parent's RSS, so it is only a fallback.
        metrics.setdefault("peak_rss_bytes", usage.ru_maxrss * 1024)
        metrics["measure_seconds"] = round(wall_seconds, 3)
        predictions = outputs = None
        if (exchange / "predictions.npy").exists():
            predictions = np.load(exchange / "predictions.npy", allow_pickle=False)
        if (exchange / "outputs.npy").exists():
            outputs = np.load(exchange / "outputs.npy", allow_pickle=False)
        return IsolatedResult(metrics, predictions, outputs)


def _without_address_randomization() -> None:
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
    host = PluginHost()
    for module_name in request["plugin_modules"]:
        if host.manager.get_plugin(module_name) is None:
            host.register(importlib.import_module(module_name), name=module_name)
    artifact = Artifact.from_json(request["artifact"])
    inputs = tuple(TensorSpec.from_json(spec) for spec in request["inputs"])
    baseline_rss = peak_rss_bytes()
    data = None
    if request["data"]:
        data = host.hook_for(artifact.backend, "compressor_load_data")(
            path=Path(request["data"]), purpose="eval", inputs=inputs, backend=artifact.backend,
            limit=settings.max_examples,
        )
    measured = _merge(host.hook_for(artifact.backend, "compressor_measure")(
        artifact=artifact, data=data, settings=settings
    ))
    measured.metrics["baseline_rss_bytes"] = baseline_rss
    measured.metrics["cpus"] = cpus
    measured.metrics["peak_rss_bytes"] = peak_rss_bytes()
    if measured.predictions is not None:
        np.save(exchange / "predictions.npy", np.asarray(measured.predictions), allow_pickle=False)
    if measured.outputs is not None:
        np.save(exchange / "outputs.npy", np.asarray(measured.outputs), allow_pickle=False)
    (exchange / "result.json").write_text(json.dumps({"metrics": measured.metrics}, default=float))


def main(argv: Sequence[str]) -> int:
    exchange = Path(argv[0])
    try:
        _run(exchange)
    except errors.CompressorError as error:
        failure = {"type": type(error).__name__, "message": error.message,
                   "path": str(error.path) if error.path else None}
        (exchange / "result.json").write_text(json.dumps({"error": failure}))
    except ModuleNotFoundError as error:
        failure = {"type": "UnsupportedError", "message": f"missing module {error.name!r}", "path": None}
        (exchange / "result.json").write_text(json.dumps({"error": failure}))
    except Exception as error:  # noqa: BLE001 - reported to the parent, traceback on stderr
        import traceback

        traceback.print_exc()
        failure = {"type": "CompressorError", "path": None,
                   "message": f"measuring failed: {type(error).__name__}: {error}"}
        (exchange / "result.json").write_text(json.dumps({"error": failure}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
