"""The command line's machinery: one-line errors and exit codes, progress, signals,
and the option types the commands share."""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import click

from compressor.errors import (
    EXIT_CODES,
    RESOURCE_ERRNOS,
    CompressorError,
    UsageError,
    first_line,
)

RESOURCE_EXIT_CODE = UsageError.exit_code
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


#: Progress state: silenced by ``--quiet``; the current message and when it began.
PROGRESS: dict[str, Any] = {"quiet": False, "message": None, "since": 0.0}


def set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.find_root().params["debug"] = True


def set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        PROGRESS["quiet"] = True


def progress(message: str, fraction: float | None) -> None:
    """One updating line on stderr (a terminal only): message, share done, seconds in it."""
    if PROGRESS["quiet"] or not sys.stderr.isatty():
        return
    now = time.monotonic()
    if message != PROGRESS["message"]:
        PROGRESS.update(message=message, since=now)
    suffix = f" {fraction:.0%}" if fraction is not None else ""
    elapsed = now - PROGRESS["since"]
    timer = f" ({elapsed:.0f} s)" if elapsed >= 2 else ""
    click.echo(f"\r\033[K{message}{suffix}{timer}", err=True, nl=False)


def end_progress() -> None:
    PROGRESS["message"] = None
    if not PROGRESS["quiet"] and sys.stderr.isatty():
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
