"""Measure one artifact in a fresh subprocess.

The parent (:func:`measure_isolated`) writes a request into a temporary folder
and runs :mod:`compressor.measure_child` on it in a fresh interpreter, which
loads only the plugin of the artifact's backend, measures and writes back
metrics and what the comparison needs, with its own peak RSS from the kernel
(``VmHWM``), so native allocations of ONNX Runtime or TensorFlow count. A
runtime that aborts becomes a clean error in the parent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor import errors, scratch
from compressor.children import child_environment, parent_death_hook, python_command
from compressor.measure_child import SCRATCH_FAILED, without_address_randomization
from compressor.models import Artifact, MeasureSettings, TensorSpec

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass
class MeasuredArtifact:
    """What the measuring process found for one artifact: the one result every backend's
    measurement comes back as (through its :class:`~compressor.runtime.Runtime`)."""

    #: Sizes, load time, latencies, memory, the runtime's own facts and figures.
    metrics: dict[str, Any]
    #: ``{output: {"task", "reason", "shape", "params"?}}``: what each output is.
    output_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ``{output: {kind: array}}``: what core kept of each output to compare it.
    kept: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The machine it was measured on (:func:`compressor.run_cache.machine`) when that was
    #: not this process's (a Ray worker's); None: here.
    machine: dict[str, Any] | None = None


#: The name this result had before the measurement contract was one.
IsolatedResult = MeasuredArtifact


def measure_isolated(
    artifact: Artifact,
    data_path: Path | None,
    inputs: Sequence[TensorSpec],
    settings: MeasureSettings,
    plugin_modules: Sequence[str] = (),
    plugin: str | None = None,
    original: Artifact | None = None,
) -> MeasuredArtifact:
    """Measure ``artifact`` in a child process and return what it found. With the
    ``original``'s artifact (same backend) and ``settings.precision``, the child also opens
    the original and times the two side by side (``latency_ratio``,
    :mod:`compressor.latency_interval`)."""
    try:
        with scratch.scratch_folder(scratch.MEASURE) as exchange:
            return _measure_in(exchange, artifact, data_path, inputs, settings, plugin_modules, plugin,
                               original)
    except OSError as error:
        if error.errno not in errors.RESOURCE_ERRNOS:
            raise
        raise scratch.tmpdir_error(scratch.scratch_root(), error) from None


def _measure_in(exchange: Path, artifact: Artifact, data_path: Path | None, inputs: Sequence[TensorSpec],
                settings: MeasureSettings, plugin_modules: Sequence[str], plugin: str | None,
                original: Artifact | None = None) -> MeasuredArtifact:
    write_request(exchange, artifact, data_path, inputs, settings, plugin_modules, plugin, original)
    environment = measuring_environment(settings)
    # What the runtime's libraries leave in TMPDIR (torch makes its inductor cache folder as
    # torch.export's deserializer is imported) goes with the exchange folder.
    temporary = exchange / "tmp"
    temporary.mkdir()
    environment["TMPDIR"] = str(temporary)
    started = time.perf_counter()
    with open(exchange / "stderr.txt", "wb") as stderr:
        process = subprocess.Popen(
            python_command("compressor.measure_child", [str(exchange)]),
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            env=environment,
            preexec_fn=_child_setup(),
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
    if process.returncode == SCRATCH_FAILED:
        problem = child_output.splitlines()[-1] if child_output else _scratch_problem(exchange)
        raise errors.UsageError(f"cannot write scratch files in TMPDIR ({exchange.parent}): {problem} "
                                "(while measuring); point TMPDIR at a writable folder with free space")
    if not result_file.exists() and process.returncode == -signal.SIGKILL:
        error: errors.CompressorError = errors.UsageError(
            f"out of memory while measuring (the measuring process was killed by SIGKILL, likely by the "
            f"kernel's out-of-memory killer, at {usage.ru_maxrss / 2**20:.1f} GiB); measure fewer or shorter "
            "examples (--max-examples, --set max_length=) or use a machine with more memory", artifact.path)
        error.child_output = child_output
        raise error
    if not result_file.exists():
        tail = child_output.splitlines()[-3:]
        error = errors.InvalidInputError(
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
    if not settings.timing_only:  # a repeat measures no memory
        metrics.setdefault("peak_rss_bytes", usage.ru_maxrss * 1024)
    metrics["measure_seconds"] = round(wall_seconds, 3)
    info = result.get("outputs", {})
    return MeasuredArtifact(metrics, info, _read_kept(exchange, info))


def write_request(exchange: Path, artifact: Artifact, data_path: Path | None, inputs: Sequence[TensorSpec],
                  settings: MeasureSettings, plugin_modules: Sequence[str] = (), plugin: str | None = None,
                  original: Artifact | None = None) -> None:
    """What :mod:`compressor.measure_child` reads: ``request.json`` in ``exchange``; ``original``
    only where the latency is to be timed against it (``settings.precision`` above 0)."""
    compared = original is not None and settings.precision > 0 and original.path != artifact.path
    request = {
        "artifact": artifact.to_json(),
        "data": str(data_path) if data_path else None,
        "inputs": [spec.to_json() for spec in inputs],
        "settings": settings.to_json(),
        "plugin_modules": list(plugin_modules),
        "plugin": plugin,
        "original": original.to_json() if compared and original is not None else None,
    }
    (exchange / "request.json").write_text(json.dumps(request))


def measuring_environment(settings: MeasureSettings) -> dict[str, str]:
    """The measuring child's environment: its thread count, and no per-process randomness."""
    environment = child_environment({name: str(settings.threads) for name in _THREAD_VARIABLES})
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The same hash seed and address layout in every repeat: per-process
    # layout luck otherwise moves microsecond latencies by tens of percent.
    environment["PYTHONHASHSEED"] = "0"
    return environment


def _scratch_problem(folder: Path) -> str:
    """Why a child could not write into ``folder``, when it could not say so itself."""
    try:
        if os.statvfs(folder).f_bavail == 0:
            return "No space left on device"
    except OSError:
        pass
    return "Read-only file system" if not os.access(folder, os.W_OK) else "a write failed"


def _child_setup() -> Callable[[], None]:
    """What the measuring child does before exec: no address randomization, and death with
    this process (a SIGKILLed run must not leave it measuring)."""
    die_with_parent = parent_death_hook()

    def in_child() -> None:
        without_address_randomization()
        die_with_parent()

    return in_child


def _read_kept(exchange: Path, info: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    import numpy as np

    kept: dict[str, dict[str, Any]] = {}
    path = exchange / "kept.npz"
    if not path.exists():
        return kept
    with np.load(path, allow_pickle=False) as archive:
        for key in archive.files:
            index, _, kind = key.partition("__")
            name = list(info)[int(index)]
            kept.setdefault(name, {})[kind] = archive[key]
    return kept


