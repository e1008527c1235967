"""This process's peak resident memory, and resetting it between phases (Linux).

``VmHWM`` in ``/proc/self/status`` is the kernel's high-water mark of resident
memory, native allocations (ONNX Runtime, TensorFlow) and touched memory-mapped
file pages included. Writing ``5`` to ``/proc/self/clear_refs`` resets it to
the current RSS, so each phase of a run (load, each variant's compress and
save) gets its own peak; :func:`lifetime_peak_rss_bytes` is the whole process's.

Work done in a child process (a forked quantizer, a fresh interpreter running a model
builder) is no part of this process's mark: the parent records the child's own peak with
:func:`note_child_peak`, and a :class:`PeakRss` block reports the largest of its process's
peak and the peaks of the children recorded inside it. Each is one process's resident set
(pages a forked child shares with its parent count in both), not their sum.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

#: The highest peak read so far (before any reset): :func:`lifetime_peak_rss_bytes` counts it.
#: This process's own: children's peaks never go into it.
_highest_read = 0
#: The :class:`PeakRss` blocks open now, outermost first.
_open_blocks: list[PeakRss] = []


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
    # The mark about to be cleared still counts: for the lifetime peak, and for every block
    # open around this reset (an inner PeakRss, a forked child's own start).
    peak = peak_rss_bytes()
    for block in _open_blocks:
        block.note(peak)
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


def note_child_peak(peak: int) -> None:
    """Record the peak resident set (bytes) of a child process this process started and waited
    for: every :class:`PeakRss` block open now reports at least ``peak``."""
    for block in _open_blocks:
        block.note(peak)


class PeakRss:
    """``with PeakRss() as peak: ...`` then ``peak.bytes``: the peak resident set of this
    process in the block, or of a child process recorded in it (:func:`note_child_peak`) where
    that was higher; None where this process's own cannot be told apart.

    Blocks nest: an inner block's reset of the mark does not hide what came before it from
    the outer one."""

    def __enter__(self) -> PeakRss:
        self.bytes: int | None = None
        self._highest = 0
        self._resettable = reset_peak_rss()
        _open_blocks.append(self)
        return self

    def note(self, peak: int) -> None:
        """A peak reached inside the block (a child's, or this process's before a reset)."""
        self._highest = max(self._highest, peak)

    def __exit__(self, *exc: object) -> None:
        if self in _open_blocks:
            _open_blocks.remove(self)
        if self._resettable:
            self.bytes = max(self._highest, peak_rss_bytes())


def release_freed_memory() -> None:
    """Hand memory freed inside this process back to the OS where the C library keeps it
    (glibc's ``malloc_trim``): a native library's freed buffers (an ONNX Runtime session just
    dropped) otherwise stay resident, and count in every later peak and in a forked child's."""
    import ctypes

    try:
        # The symbols already loaded (no library search, which runs ldconfig on Linux).
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS: no malloc_trim)
        return
    trim(0)


#: ``madvise``'s advice to drop a range's pages from the process (``<sys/mman.h>`` on Linux).
_MADV_DONTNEED = 4


def release_mapped_file_pages(suffixes: tuple[str, ...]) -> int:
    """Drop from this process's resident set the pages it has read of mapped files whose path
    ends in one of ``suffixes`` (``(".safetensors",)``), and return the bytes of the mappings
    advised. A weight file mapped and read once, tensor by tensor, otherwise stays resident
    whole and counts in the peak as a second copy of the weights; a dropped page is read again
    from the file if touched. Only mappings none of whose pages was written (``Anonymous: 0 kB``
    in ``/proc/self/smaps``: torch maps safetensors files private and writable) are advised, so
    no data changes. Linux only; elsewhere 0."""
    import ctypes

    try:
        mappings = Path("/proc/self/smaps").read_text(encoding="utf-8", errors="replace")
        advise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError, TypeError):
        return 0
    advise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for start, end in _unwritten_mappings(mappings, suffixes):
        if advise(start, end - start, _MADV_DONTNEED) == 0:
            released += end - start
    return released


def _unwritten_mappings(smaps: str, suffixes: tuple[str, ...]) -> list[tuple[int, int]]:
    """The address ranges in ``smaps`` (``/proc/self/smaps``) of files ending in ``suffixes``
    with no anonymous (copied on write) page."""
    found: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for line in smaps.splitlines():
        fields = line.split(maxsplit=5)  # a header: range, permissions, offset, device, inode, path
        if len(fields) >= 5 and "-" in fields[0] and ":" not in fields[0]:
            bounds = fields[0].split("-")
            named = len(fields) == 6 and fields[5].endswith(suffixes)
            current = (int(bounds[0], 16), int(bounds[1], 16)) if named else None
        elif current is not None and fields[:1] == ["Anonymous:"]:
            if fields[1] == "0":
                found.append(current)
            current = None
    return found
