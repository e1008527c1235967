"""The share of a run done, for progress callbacks.

A run counts its work before it starts (loading, making each variant step by step,
measuring each artifact once per repeat: one unit each) and names every unit as it
begins; a callback then gets ``(message, share)`` with ``share`` from 0 to 1 over the
whole run (every backend of ``--backend a,b``). A plugin's own progress
(``context.progress("calibrating", 0.4)``) is told as part of the unit under way.
The seconds each unit takes are the printer's to show (:mod:`compressor.clibase`).
"""

from __future__ import annotations

from compressor.models import ProgressCallback


class RunProgress:
    """A :data:`~compressor.models.ProgressCallback` that knows how much of the run is done.

    >>> heard = []
    >>> progress = RunProgress(lambda message, share: heard.append((message, share)))
    >>> progress.plan(4)
    >>> progress.begin("[1/2] original")
    >>> progress("saving", 0.5)
    >>> progress.begin("[2/2] fp16", units=3)
    >>> progress.finish()
    >>> heard
    [('[1/2] original', 0.0), ('[1/2] original: saving', 0.125), ('[2/2] fp16', 0.25), ('done', 1.0)]
    """

    def __init__(self, callback: ProgressCallback, prefix: str = "") -> None:
        self.callback = callback
        self.prefix = prefix
        self.total = 0.0
        self.done = 0.0
        self.label = ""
        self.units = 0.0

    def plan(self, units: float) -> None:
        """Count ``units`` more of work ahead."""
        self.total += max(0.0, units)

    def begin(self, label: str, units: float = 1.0) -> None:
        """The unit before is done; ``label`` (``units`` of work) starts."""
        self.done += self.units
        self.label, self.units = label, units
        self._tell(self.prefix + label, 0.0)

    def finish(self) -> None:
        self.done += self.units
        self.units = 0.0
        self.label = ""
        self._tell("done", 1.0)

    def __call__(self, message: str, fraction: float | None) -> None:
        """A message within the unit under way (a plugin's ``context.progress``)."""
        text = f"{self.prefix}{self.label}: {message}" if self.label else self.prefix + message
        self._tell(text, fraction or 0.0)

    def _tell(self, message: str, within: float) -> None:
        if self.total <= 0:
            self.callback(message, None)
            return
        share = (self.done + self.units * min(max(within, 0.0), 1.0)) / self.total
        self.callback(message, round(min(max(share, 0.0), 1.0), 4))

    def nested(self, prefix: str) -> RunProgress:
        """The same count under another prefix (one backend of several)."""
        nested = _Nested(self, prefix)
        return nested


class _Nested(RunProgress):
    """One backend's view of a shared :class:`RunProgress`: units counted on the shared one."""

    def __init__(self, shared: RunProgress, prefix: str) -> None:
        super().__init__(shared.callback, prefix)
        self.shared = shared

    def plan(self, units: float) -> None:
        self.shared.plan(units)

    def begin(self, label: str, units: float = 1.0) -> None:
        self.shared.prefix = self.prefix
        self.shared.begin(label, units)

    def finish(self) -> None:
        self.shared.done += self.shared.units
        self.shared.units = 0.0
        self.shared.label = ""

    def __call__(self, message: str, fraction: float | None) -> None:
        self.shared.prefix = self.prefix
        self.shared(message, fraction)


def tracking(progress: ProgressCallback) -> RunProgress:
    """``progress`` as a :class:`RunProgress` (itself when it is one)."""
    return progress if isinstance(progress, RunProgress) else RunProgress(progress)


def begin(progress: ProgressCallback, label: str, units: float = 1.0) -> None:
    """Start a unit of work on ``progress``, whether it counts the run's share or not."""
    if isinstance(progress, RunProgress):
        progress.begin(label, units)
    else:
        progress(label, None)
