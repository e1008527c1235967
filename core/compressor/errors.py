"""The errors compressor raises for user mistakes, each mapped to an exit code.

The CLI prints ``error: <path>: <message>`` on one line and exits with
:attr:`CompressorError.exit_code`; ``--debug`` shows the traceback instead.
Backends raise these too, so a corrupt ``.onnx`` and a corrupt ``.ftz`` look
the same to the user.

=====  ===================  ==================================================
code   error                meaning
=====  ===================  ==================================================
1      (unexpected)         a bug: please report it with ``--debug`` output
2      UsageError           bad arguments, recipe or ``--out`` (exists, etc.);
                           also disk full, no permission, out of memory
3      UnsafeInputError     the input would run code or escape its folder
4      InvalidInputError    a model or data file is corrupt or does not fit
5      UnsupportedError     backend/technique/mode not available or installed
6      BudgetError          a variant fell outside ``--max-accuracy-drop`` etc.
7      CompressionError     a backend failed to apply a step to a valid model
=====  ===================  ==================================================
"""

from __future__ import annotations

import errno
from pathlib import Path

#: OS errors that are the machine's state or a name the user chose, not a bug: reported in
#: one line, exit 2. EFBIG is a file size limit (``ulimit -f``); ENAMETOOLONG a path or name
#: longer than the filesystem allows.
RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                             errno.EMFILE, errno.ENFILE, errno.EFBIG, errno.ENAMETOOLONG})
_ERRNO_HINTS = {errno.EFBIG: "a file size limit (ulimit -f) was reached",
                errno.ENAMETOOLONG: "a file name or path is longer than the filesystem allows"}


def os_problem(error: OSError) -> str:
    """An OS error as a short phrase for a one-line message: the system's text plus, for
    the less familiar ones, what it usually means."""
    text = error.strerror or type(error).__name__
    hint = _ERRNO_HINTS.get(error.errno or 0)
    return f"{text} ({hint})" if hint else text


class CompressorError(Exception):
    """Base class: a problem the user can act on, reported without a traceback."""

    exit_code = 1

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = Path(path) if path is not None else None
        #: What a child process (the measuring worker) printed, its traceback
        #: included; ``--debug`` shows it.
        self.child_output = ""
        #: The tracebacks of plugin exceptions this error reports (variants whose compress or
        #: save raised, each titled); ``--debug`` shows them.
        self.plugin_tracebacks: list[str] = []

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path is not None else self.message


class UsageError(CompressorError):
    """Bad command-line arguments, recipe, option or output location."""

    exit_code = 2


class UnsafeInputError(CompressorError):
    """Loading the input would execute code or read outside its folder."""

    exit_code = 3


class InvalidInputError(CompressorError):
    """A model or data file is corrupt, truncated or does not match the model."""

    exit_code = 4


class UnsupportedError(CompressorError):
    """The backend, technique or mode is unknown, unsupported or not installed."""

    exit_code = 5


class BudgetError(CompressorError):
    """At least one variant fell outside an accuracy or agreement budget."""

    exit_code = 6


class CompressionError(CompressorError):
    """A backend could not apply a step to an otherwise valid model."""

    exit_code = 7


def first_line(error: BaseException, limit: int = 200) -> str:
    """A framework exception's first line, short enough for a one-line error."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected internal error (a bug; rerun with --debug)",
    UsageError.exit_code: "usage error: arguments, recipe, options or output folder; "
    "or out of disk space, permission or memory",
    UnsafeInputError.exit_code: "unsafe input refused (would run code or escape its folder)",
    InvalidInputError.exit_code: "corrupt or mismatched model or data file",
    UnsupportedError.exit_code: "unsupported or uninstalled backend, technique or mode",
    BudgetError.exit_code: "a variant failed --max-accuracy-drop / --min-agreement",
    CompressionError.exit_code: "a backend failed to apply a step",
}
