"""This machine's memory bandwidth, from a short copy benchmark (STREAM's "copy").

Decoding one token at batch 1 reads every weight once, so a causal LM cannot decode
faster than ``bandwidth / weight bytes`` tokens per second; the report states each
variant's decode speed as a share of that bound (:mod:`compressor.generation`).

The probe copies arrays much larger than any CPU cache with ``threads`` threads (NumPy
releases the GIL while copying) and counts bytes read plus bytes written, as STREAM does;
the best of a few rounds stands. It runs in a forked child so that its buffers never count
in the measuring process's peak memory.
"""

from __future__ import annotations

import time

#: Bytes each of the source and destination arrays holds, in all threads together: several
#: times the largest last-level caches (32 MiB per EPYC chiplet, up to 1 GiB with 3D V-cache
#: only on a few parts, which this probe would overstate).
PROBE_BYTES = 256 * 1024 * 1024
ROUNDS = 5


def memory_bandwidth_gbs(threads: int = 1, probe_bytes: int = PROBE_BYTES, rounds: int = ROUNDS) -> float:
    """Copy bandwidth in GB/s (10^9 bytes), read plus written, with ``threads`` threads."""
    from compressor.children import run_in_fork

    return run_in_fork(_copy_bandwidth, max(1, threads), probe_bytes, rounds, step="the memory bandwidth probe")


def _copy_bandwidth(threads: int, probe_bytes: int, rounds: int) -> float:
    import threading

    import numpy as np

    count = max(1, probe_bytes // 8 // threads)
    sources = [np.ones(count, dtype=np.float64) for _ in range(threads)]
    targets = [np.zeros(count, dtype=np.float64) for _ in range(threads)]

    def copy(index: int) -> None:
        np.copyto(targets[index], sources[index])

    best = float("inf")
    for round_index in range(rounds + 1):  # the first round touches every page: not counted
        workers = [threading.Thread(target=copy, args=(index,)) for index in range(threads)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - started
        if round_index > 0:
            best = min(best, elapsed)
    moved = 2 * count * 8 * threads
    return moved / best / 1e9


def last_level_cache_bytes() -> int:
    """The largest CPU cache of this machine (Linux sysfs), or 32 MiB where it cannot be read:
    weights that fit in it are not read from memory each token, so no memory bound holds."""
    from pathlib import Path

    largest = 0
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip().upper()
            value = int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        except (OSError, ValueError):
            continue
        largest = max(largest, value)
    return largest or 32 << 20
