"""What native code writes to the process's file descriptors stays out of the CLI's
output where a backend silences it (an exporter dumping its IR graph on failure)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import os, sys
from compressor.native import native_output_silenced
print("before", flush=True)
with native_output_silenced():
    os.write(1, b"native stdout\\n")
    os.write(2, b"native stderr\\n")
    print("python stdout")
with native_output_silenced(stdout=False):
    os.write(1, b"kept stdout\\n")
    os.write(2, b"hidden stderr\\n")
print("after", flush=True)
"""


def test_native_writes_are_silenced_and_the_descriptors_restored() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["before", "kept", "stdout", "after"]
    assert result.stderr == ""
