"""Silencing what native (C/C++) code of a framework writes straight to the process's
file descriptors, where ``contextlib.redirect_stdout`` cannot reach: exporters
dumping their IR graph on failure, converters' progress lines, absl start-up chatter.
Backends wrap such calls; Python errors still arrive as exceptions."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager


@contextmanager
def native_output_silenced(stdout: bool = True, stderr: bool = True) -> Iterator[None]:
    """Send file descriptors 1 and/or 2 to a scratch file while the block runs."""
    descriptors = [fd for fd, wanted in ((1, stdout), (2, stderr)) if wanted]
    with ExitStack() as stack:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd in descriptors:
            saved = os.dup(fd)
            sink = stack.enter_context(tempfile.TemporaryFile())
            os.dup2(sink.fileno(), fd)
            stack.callback(_restore, fd, saved)
        yield


def _restore(fd: int, saved: int) -> None:
    # What Python buffered inside the block goes where the block sent it.
    (sys.stdout if fd == 1 else sys.stderr).flush()
    os.dup2(saved, fd)
    os.close(saved)
