"""Start Python child processes that import nothing from the working directory.

``python -m module`` puts the current directory first on ``sys.path``, so a
``json.py`` or ``fasttext.py`` in the folder the user runs compressor from would
run inside the child. Children are started with ``-c`` and a bootstrap that
drops that entry before anything is imported (plus ``-P`` where Python has it),
and with ``PYTHONPATH`` rebuilt from the parent's ``sys.path`` minus the
working directory (kept only where the user's ``PYTHONPATH`` names it by its
absolute path), so plugins registered in-process still reach them.

Children die with their parent (:func:`parent_death_hook`). Work that may crash the
process natively or run it out of memory (a quantizer under ``ulimit -v``) runs in a
forked child with :func:`run_in_fork`, where either becomes a one-line error. Work that
must not share the parent's memory (a model builder beside a loaded model) runs in a fresh
interpreter with :func:`run_python_child`. A child's own peak resident set counts in the
peak of the phase that started it (:func:`compressor.memory.note_child_peak`): run_in_fork
records it; a :func:`run_python_child` child sends it back with its result.
"""

from __future__ import annotations

import functools
import os
import signal
import struct
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from compressor.errors import CompressionError, CompressorError, UsageError, first_line
from compressor.memory import PeakRss, note_child_peak, peak_rss_bytes

#: Runs ``MODULE.main(argv)`` and exits with its result. ``sys.path[0]`` is the
#: working directory ('') under ``-c`` without ``-P``; it goes before any import.
_BOOTSTRAP = (
    "import sys\n"
    "if sys.path and sys.path[0] in ('', '.'): del sys.path[0]\n"
    "import importlib\n"
    "sys.exit(importlib.import_module(sys.argv[1]).main(sys.argv[2:]))\n"
)


def python_command(module: str, arguments: Sequence[str] = ()) -> list[str]:
    """The command line that runs ``module.main(arguments)`` in a fresh interpreter."""
    flags = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *flags, "-c", _BOOTSTRAP, module, *arguments]


def import_path(cwd: str | None = None) -> str:
    """The parent's ``sys.path`` as ``PYTHONPATH``, without the working directory, unless
    the user's own ``PYTHONPATH`` names it by its absolute path (a model factory kept
    there must import in the child too)."""
    here = os.path.realpath(cwd or os.getcwd())
    named = {os.path.realpath(entry) for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep)
             if os.path.isabs(entry)}
    kept = [
        entry for entry in sys.path
        if entry and entry != "." and (os.path.realpath(entry) != here or here in named)
    ]
    from compressor.factories import factory_folders

    # A folder a named model_factory or student was imported from (last: it shadows nothing).
    return os.pathsep.join(dict.fromkeys([*kept, *factory_folders()]))


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` plus ``extra``, with ``PYTHONPATH`` from :func:`import_path`."""
    environment = dict(os.environ)
    environment.update(extra or {})
    environment["PYTHONPATH"] = import_path()
    # Debugging hooks that import arbitrary modules at start-up have no place here.
    environment.pop("PYTHONSTARTUP", None)
    return environment


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, looked up in the parent: a child between fork and exec must not load libraries."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_PR_SET_PDEATHSIG = 1


def parent_death_hook() -> Callable[[], None]:
    """For ``subprocess.Popen(preexec_fn=...)`` (Linux): the child is killed when the thread
    that started it ends, its process killed outright (SIGKILL) included, so nothing keeps
    measuring for ``--min-seconds`` after its run is gone. Call it in the parent; the thread
    must wait for the child, as :func:`compressor.worker.measure_isolated` does."""
    prctl, parent = _prctl(), os.getpid()

    def in_child() -> None:
        die_with(parent, prctl)

    return in_child


def die_with(parent: int, prctl: Callable[..., int] | None = None) -> None:
    """In a child: ask the kernel for SIGKILL when ``parent`` goes; if it already went
    (between the fork and now), go at once."""
    prctl = prctl or _prctl()
    if prctl is None:
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def run_python_child(module: str, arguments: Sequence[str], printed: Path, step: object,
                     environment: Mapping[str, str] | None = None) -> int:
    """Run ``module.main(arguments)`` in a fresh interpreter (:func:`python_command`: not a
    fork, so nothing of this process's memory, a loaded model included, is in it) with
    :func:`child_environment` plus ``environment``, and wait for it; return its exit status.

    What it prints (stdout and stderr, native output included) goes into the file
    ``printed``, in the order printed (its Python output unbuffered). It dies with this
    process (:func:`parent_death_hook`) and is killed when the wait is interrupted (Ctrl-C,
    SIGTERM). Death by a signal is the one-line error
    :func:`run_in_fork` gives, naming ``step``: SIGKILL is likely the kernel's
    out-of-memory killer (UsageError, exit 2), another a crash (CompressionError, exit 7).
    Its peak resident set is the module's to send back (its ``VmHWM``, new with ``exec``),
    and the caller's to record (:func:`compressor.memory.note_child_peak`)."""
    import subprocess

    with open(printed, "wb") as output:
        process = subprocess.Popen(python_command(module, arguments), stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=output,
                                   env=child_environment({"PYTHONUNBUFFERED": "1", **(environment or {})}),
                                   preexec_fn=parent_death_hook())
        try:
            _, status, _ = os.wait4(process.pid, 0)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): the child must not outlive this
            process.kill()
            process.wait()
            raise
        process.returncode = os.waitstatus_to_exitcode(status)
    if os.WIFSIGNALED(status):
        raise _crash(os.WTERMSIG(status), step)
    return process.returncode


T = TypeVar("T")


def run_in_fork(function: Callable[..., T], *args: Any, step: object, **kwargs: Any) -> T:
    """``function(*args, **kwargs)`` run in a forked child process; its result (which must
    pickle) returned here.

    What would kill or wreck this process there becomes one line naming ``step`` (the
    step being applied, e.g. ``quantize int8``):

    * a ``MemoryError`` (also as the cause or context of the error raised): UsageError,
      "out of memory", exit 2;
    * death by a signal (a native crash): CompressionError, exit 7, or the out-of-memory
      UsageError when memory is the likely cause: SIGKILL (the kernel's OOM killer), or
      SIGSEGV/SIGBUS/SIGABRT while an address-space limit (``ulimit -v``) is set, under
      which native code that does not check its allocations crashes;
    * any other exception is raised here as it was (a CompressionError from ``function``
      keeps its exit code); one that does not pickle becomes a CompressionError.

    The child dies with this process. It is a fork: ``function`` sees the parent's memory
    as it was (a loaded model too) but not other threads, so it should be one
    self-contained piece of work, such as one call into a native library. The child's own
    peak resident set (its mark reset as it starts: a fork's would carry the parent's) comes
    back with its outcome and is recorded (:func:`compressor.memory.note_child_peak`).
    """
    import pickle

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    parent, prctl = os.getpid(), _prctl()
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(reader)
        _child(writer, parent, prctl, lambda: function(*args, **kwargs))
    os.close(writer)
    try:
        with os.fdopen(reader, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): the child must not outlive this
        _kill_and_reap(pid)
        raise
    if os.WIFSIGNALED(status):
        raise _crash(os.WTERMSIG(status), step)
    if len(data) <= _PEAK.size or os.waitstatus_to_exitcode(status) != 0:
        raise CompressionError(f"the process applying '{step}' exited with status "
                               f"{os.waitstatus_to_exitcode(status)} and no result")
    (child_peak,) = _PEAK.unpack_from(data)
    note_child_peak(child_peak)
    outcome = pickle.loads(memoryview(data)[_PEAK.size:])
    if outcome[0] == "ok":
        return outcome[1]  # type: ignore[no-any-return]
    if outcome[0] == "memory":
        raise _out_of_memory(step, "")
    if outcome[0] == "error":
        raise outcome[1]
    raise CompressionError(f"applying '{step}' failed ({outcome[1]}: {outcome[2]})")


def _child(writer: int, parent: int, prctl: Callable[..., int] | None, call: Callable[[], Any]) -> None:
    import faulthandler

    status = 0
    try:
        die_with(parent, prctl)
        faulthandler.disable()  # a crash is reported by the parent, in one line
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        # The block resets the mark (a fork's starts from the parent's: the child's own from
        # here) and counts this child's own children (a quantizer that forks again).
        with PeakRss() as peak:
            try:
                outcome: tuple[Any, ...] = ("ok", call())
            except BaseException as error:  # noqa: BLE001 - everything goes back to the parent
                outcome = ("memory",) if _from_memory(error) else ("error", error)
            data = _pickled(outcome)
        # The peak read last, the pickled outcome in memory included; sent first.
        sent = peak.bytes if peak.bytes is not None else peak_rss_bytes()
        for chunk in (_PEAK.pack(sent), data):
            view = memoryview(chunk)
            while view:
                view = view[os.write(writer, view):]
    except BaseException:  # noqa: BLE001 - the parent reports a child without a result
        status = 70
    finally:
        for stream in (sys.stdout, sys.stderr):
            with suppress(BaseException):  # nothing may stop the exit below
                stream.flush()
        os._exit(status)


#: What a forked child writes before its pickled outcome: its peak resident set in bytes.
_PEAK = struct.Struct("<Q")


def _pickled(outcome: tuple[Any, ...]) -> bytes:
    """``outcome`` pickled; where it does not pickle, what the parent can still report."""
    import pickle

    try:
        return pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException as error:  # noqa: BLE001 - an unpicklable result or exception
        if isinstance(error, MemoryError):
            return pickle.dumps(("memory",))
        failed = outcome[1] if outcome[0] == "error" else error
        return pickle.dumps(("failed", type(failed).__name__, first_line(failed)))


def _from_memory(error: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, MemoryError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _memory_limited() -> bool:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return soft != resource.RLIM_INFINITY


def _out_of_memory(step: object, how: str) -> UsageError:
    limit = " under the address-space limit (ulimit -v)" if _memory_limited() else ""
    return UsageError(f"out of memory while applying '{step}'{how}{limit}; "
                      "try a machine with more memory or a higher limit")


def _crash(number: int, step: object) -> CompressorError:
    name = signal.Signals(number).name if number in signal.valid_signals() else f"signal {number}"
    if number == signal.SIGKILL:
        return _out_of_memory(step, f" (killed by {name}, likely by the kernel's out-of-memory killer)")
    if _memory_limited() and number in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT):
        return _out_of_memory(step, f" (the native code crashed with {name})")
    return CompressionError(f"applying '{step}' crashed the native code ({name})")


def _kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except OSError:
        pass


@contextmanager
def out_of_memory_named(step: object) -> Iterator[None]:
    """A ``MemoryError`` in the block (also one a backend wrapped in its own error) as the
    one-line UsageError of :func:`run_in_fork`, naming ``step``: exit 2, not a failed step."""
    try:
        yield
    except Exception as error:
        if not _from_memory(error):
            raise
        raise _out_of_memory(step, "") from None
