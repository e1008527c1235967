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
forked child with :func:`run_in_fork`, where either becomes a one-line error.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

from compressor.errors import CompressionError, CompressorError, UsageError, first_line

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
    self-contained piece of work, such as one call into a native library.
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
    if not data:
        raise CompressionError(f"the process applying '{step}' exited with status "
                               f"{os.waitstatus_to_exitcode(status)} and no result")
    outcome = pickle.loads(data)
    if outcome[0] == "ok":
        return outcome[1]  # type: ignore[no-any-return]
    if outcome[0] == "memory":
        raise _out_of_memory(step, "")
    if outcome[0] == "error":
        raise outcome[1]
    raise CompressionError(f"applying '{step}' failed ({outcome[1]}: {outcome[2]})")


def _child(writer: int, parent: int, prctl: Callable[..., int] | None, call: Callable[[], Any]) -> None:
    import faulthandler
    import pickle

    status = 0
    try:
        die_with(parent, prctl)
        faulthandler.disable()  # a crash is reported by the parent, in one line
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        try:
            outcome: tuple[Any, ...] = ("ok", call())
        except BaseException as error:  # noqa: BLE001 - everything goes back to the parent
            outcome = ("memory",) if _from_memory(error) else ("error", error)
        try:
            data = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException as error:  # noqa: BLE001 - an unpicklable result or exception
            if isinstance(error, MemoryError):
                data = pickle.dumps(("memory",))
            else:
                failed = outcome[1] if outcome[0] == "error" else error
                data = pickle.dumps(("failed", type(failed).__name__, first_line(failed)))
        view = memoryview(data)
        while view:
            view = view[os.write(writer, view):]
    except BaseException:  # noqa: BLE001 - the parent reports a child without a result
        status = 70
    finally:
        for stream in (sys.stdout, sys.stderr):
            with suppress(BaseException):  # nothing may stop the exit below
                stream.flush()
        os._exit(status)


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
