"""This process's peak resident memory, and resetting it between phases (Linux).

``VmHWM`` in ``/proc/self/status`` is the kernel's high-water mark of resident
memory, native allocations (ONNX Runtime, TensorFlow) and touched memory-mapped
file pages included. Writing ``5`` to ``/proc/self/clear_refs`` resets it to
the current RSS, so each phase of a run (load, each variant's compress and
save) gets its own peak; :func:`lifetime_peak_rss_bytes` is the whole process's.
"""

from __future__ import annotations

import resource
import sys

#: The highest peak read so far (before any reset): :func:`lifetime_peak_rss_bytes` counts it.
_highest_read = 0


def peak_rss_bytes() -> int:
    """This process's peak resident set from the kernel (``VmHWM``).

    ``VmHWM`` belongs to the address space, which ``exec`` makes new, so unlike
    ``ru_maxrss`` it does not inherit the parent's size."""
    global _highest_read
    peak = _read_peak_rss()
    _highest_read = max(_highest_read, peak)
    return peak


def _read_peak_rss() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


def reset_peak_rss() -> bool:
    """Start a new high-water mark at the current RSS; False where the OS cannot."""
    peak_rss_bytes()  # the mark about to be cleared still counts for the lifetime peak
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def lifetime_peak_rss_bytes() -> int:
    """This process's peak resident set since it started, across :func:`reset_peak_rss`.

    The kernel keeps the high-water mark itself (no sampling), so read at the end of
    the process it covers every phase, however short its peak was. The kernel's
    counters are approximate by some pages: the highest figure read before counts too,
    so this is never below a phase's ``peak_rss_bytes``."""
    return max(_highest_read, peak_rss_bytes())


class PeakRss:
    """``with PeakRss() as peak: ...`` then ``peak.bytes`` (None where it cannot be told apart)."""

    def __enter__(self) -> PeakRss:
        self.bytes: int | None = None
        self._resettable = reset_peak_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._resettable:
            self.bytes = peak_rss_bytes()
