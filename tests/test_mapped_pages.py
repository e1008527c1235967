"""``release_mapped_file_pages``: the pages read of a mapped weight file leave the resident set
and read back the same; a mapping with a page written is left as it is."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import numpy as np
import pytest

from compressor.plugin import release_mapped_file_pages

SIZE = 32 * 2**20
#: A suffix no other test maps (a worker may still map a model's safetensors file).
SUFFIX = ".mapped-pages-test"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")


def resident_file_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


def mapped(path: Path) -> tuple[mmap.mmap, np.ndarray]:
    """``path`` mapped private and writable, as torch maps a safetensors file."""
    with path.open("rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    return mapping, np.frombuffer(mapping, dtype=np.uint8)


def test_the_pages_read_are_dropped_and_read_back_the_same(tmp_path: Path) -> None:
    weights = np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8)
    path = tmp_path / f"model{SUFFIX}"
    weights.tofile(path)
    mapping, view = mapped(path)
    before = resident_file_bytes()
    checksum = int(view.sum(dtype=np.int64))  # reads every page
    assert resident_file_bytes() - before > SIZE * 0.9
    assert release_mapped_file_pages((".another-suffix",)) == 0
    assert release_mapped_file_pages((SUFFIX,)) >= SIZE
    assert resident_file_bytes() - before < SIZE * 0.1
    assert int(view.sum(dtype=np.int64)) == checksum and np.array_equal(view, weights)
    del view
    mapping.close()


def test_a_mapping_with_a_page_written_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / f"model{SUFFIX}"
    np.zeros(SIZE, dtype=np.uint8).tofile(path)
    mapping, view = mapped(path)
    mapping[SIZE // 2] = 7  # copied on write: the mapping now differs from the file
    assert int(view.sum(dtype=np.int64)) == 7
    assert release_mapped_file_pages((SUFFIX,)) == 0
    assert view[SIZE // 2] == 7 and path.read_bytes()[SIZE // 2] == 0
    del view
    mapping.close()
