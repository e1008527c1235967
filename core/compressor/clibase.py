"""The command line's machinery: one-line errors and exit codes, progress, signals,
and the option types the commands share."""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import click

from compressor.errors import (
    EXIT_CODES,
    RESOURCE_ERRNOS,
    CompressorError,
    UsageError,
    first_line,
)

if TYPE_CHECKING:
    from compressor.plugins import PluginHost

RESOURCE_EXIT_CODE = UsageError.exit_code
#: 128 + SIGPIPE, what a shell shows for a tool stopped by a closed pipe.
BROKEN_PIPE_EXIT_CODE = 141
EXIT_CODE_HELP = "\b\nExit codes:\n" + "\n".join(
    f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items()
)


class CompressorGroup(click.Group):
    """Maps :class:`CompressorError` to a one-line message and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CompressorError as error:
            if ctx.params.get("debug"):
                if error.child_output:
                    click.echo(f"--- the measuring process printed ---\n{error.child_output}\n---", err=True)
                for text in error.plugin_tracebacks:
                    click.echo(f"--- {text}\n---", err=True)
                raise
            click.echo(f"error: {error}", err=True)
            ctx.exit(error.exit_code)
        except KeyboardInterrupt as error:
            if TERMINATION["signal"] is not None and not isinstance(error, Terminated):
                # Ray turns the Terminated raised while it waits into a bare KeyboardInterrupt.
                error = Terminated(TERMINATION["signal"])
            click.echo(f"error: {str(error) or 'interrupted'}", err=True)
            ctx.exit(getattr(error, "exit_code", 130))
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except MemoryError:
            if ctx.params.get("debug"):
                raise
            click.echo("error: ran out of memory; try a machine with more RAM or fewer variants at once",
                       err=True)
            ctx.exit(RESOURCE_EXIT_CODE)
        except BrokenPipeError:
            # The reader went away (``compressor backends | head``): stop quietly, as other
            # command-line tools do; stdout goes to /dev/null so the interpreter's own
            # flush at exit cannot raise again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(BROKEN_PIPE_EXIT_CODE)
        except OSError as error:
            if ctx.params.get("debug"):
                raise
            if error.errno not in RESOURCE_ERRNOS:
                return self._unexpected(ctx, error)
            where = f"{error.filename}: " if error.filename else ""
            click.echo(f"error: {where}{error.strerror}", err=True)
            ctx.exit(RESOURCE_EXIT_CODE)
        except Exception as error:  # noqa: BLE001 - a bug: one line unless --debug
            if ctx.params.get("debug"):
                raise
            return self._unexpected(ctx, error)

    @staticmethod
    def _unexpected(ctx: click.Context, error: BaseException) -> None:
        click.echo(
            f"error: unexpected {type(error).__name__}: {first_line(error)} "
            "(rerun with --debug for the traceback)",
            err=True,
        )
        ctx.exit(1)


#: Progress state: silenced by ``--quiet``; the current message, when it began, the run's
#: share done, when the run began and when a line was last written (not on a terminal).
PROGRESS: dict[str, Any] = {"quiet": False, "message": None, "since": 0.0, "fraction": None, "started": None,
                            "written": 0.0}
#: Seconds between progress lines when stderr is not a terminal (a log, a pipe, CI).
PROGRESS_EVERY = {"seconds": 10.0}
_PROGRESS_LOCK = threading.Lock()
_TICKER: dict[str, Any] = {"thread": None, "stop": None}


def set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.find_root().params["debug"] = True


def set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        PROGRESS["quiet"] = True


def progress(message: str, fraction: float | None) -> None:
    """Progress on stderr: on a terminal one updating line (the share of the run done,
    the message, the seconds spent on it, refreshed every second); elsewhere a line
    every :data:`PROGRESS_EVERY` seconds, none for a shorter run. ``--quiet``: nothing."""
    if PROGRESS["quiet"]:
        return
    with _PROGRESS_LOCK:
        now = time.monotonic()
        if message != PROGRESS["message"]:
            PROGRESS.update(message=message, since=now)
        if PROGRESS["started"] is None:
            PROGRESS.update(started=now, written=now)
        PROGRESS["fraction"] = fraction
        if sys.stderr.isatty():
            _draw(now)
    _start_ticker()


def progress_line(now: float) -> str:
    """``40% [2/4] dynamic: quantize dynamic, 12 s`` (the share and seconds where known)."""
    fraction, elapsed = PROGRESS["fraction"], now - PROGRESS["since"]
    share = f"{fraction:>4.0%} " if fraction is not None else ""
    timer = f", {elapsed:.0f} s" if elapsed >= 2 else ""
    return f"{share}{PROGRESS['message']}{timer}"


def _draw(now: float) -> None:
    click.echo(f"\r\033[K{progress_line(now)}", err=True, nl=False)


def _tick() -> None:
    """A terminal's line redrawn every second, so its seconds move while a step runs; elsewhere
    a full line once :data:`PROGRESS_EVERY` seconds passed since the last one."""
    with _PROGRESS_LOCK:
        if PROGRESS["message"] is None or PROGRESS["quiet"]:
            return
        now = time.monotonic()
        if sys.stderr.isatty():
            _draw(now)
        elif now - PROGRESS["written"] >= PROGRESS_EVERY["seconds"]:
            total = now - PROGRESS["started"]
            click.echo(f"progress: {progress_line(now)} ({total:.0f} s in all)", err=True)
            PROGRESS["written"] = now


def _start_ticker() -> None:
    if _TICKER["thread"] is not None and _TICKER["thread"].is_alive():
        return
    stop = threading.Event()
    interval = min(1.0, PROGRESS_EVERY["seconds"])

    def loop() -> None:
        while not stop.wait(interval):
            try:
                _tick()
            except Exception:  # noqa: BLE001 - a closed stream must not kill the run's thread noisily
                return

    thread = threading.Thread(target=loop, name="compressor-progress", daemon=True)
    _TICKER.update(thread=thread, stop=stop)
    thread.start()


def _after_fork_in_child() -> None:
    """A forked child (:func:`compressor.children.run_in_fork`) has no ticker thread, and the
    lock may have been held by it at the fork: both start afresh."""
    global _PROGRESS_LOCK
    _PROGRESS_LOCK = threading.Lock()
    _TICKER.update(thread=None, stop=None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def end_progress() -> None:
    thread, stop = _TICKER["thread"], _TICKER["stop"]
    if stop is not None:
        stop.set()
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout=5)
    _TICKER.update(thread=None, stop=None)
    with _PROGRESS_LOCK:
        drawn = PROGRESS["message"] is not None
        PROGRESS.update(message=None, fraction=None, started=None)
        if drawn and not PROGRESS["quiet"] and sys.stderr.isatty():
            click.echo("\r\033[K", err=True, nl=False)


class FiniteFloatRange(click.FloatRange):
    """A float range that refuses nan and infinity (which would switch a budget off)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def threads_within_cpus(ctx: click.Context, param: click.Parameter, value: int) -> int:
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if value > available:
        raise click.BadParameter(f"{value} is more than the {available} CPUs this process may use")
    return value


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so every cleanup runs."""

    def __init__(self, signal_number: int) -> None:
        import signal

        super().__init__(f"terminated by {signal.Signals(signal_number).name}")
        self.exit_code = 128 + signal_number


#: The termination signal received (SIGTERM, SIGHUP), if any.
TERMINATION: dict[str, int | None] = {"signal": None}


def _terminate(signal_number: int, frame: object) -> None:
    import signal

    TERMINATION["signal"] = signal_number
    for name in ("SIGTERM", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)  # a second one must not cut the cleanup short
    raise Terminated(signal_number)


def handle_termination_signals() -> None:
    """SIGTERM and SIGHUP unwind the run like Ctrl-C (the CLI only; the Python API leaves signals alone)."""
    import signal

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _terminate)


def plugin_host() -> PluginHost:
    """The process-wide plugin host, its loading warnings printed (once) on stderr."""
    from compressor.plugins import get_host, print_warnings

    host = get_host()
    print_warnings(host)
    host.warnings.clear()
    return host


def parse_settings(pairs: tuple[str, ...]) -> dict[str, str]:
    """``--set KEY=VALUE`` pairs as a dict."""
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--set")
        settings[key.strip()] = value
    return settings
