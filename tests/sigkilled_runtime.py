"""A plugin module whose runtime is killed by SIGKILL when it runs the original toy model, as
the kernel's out-of-memory killer would kill a measuring process (tests/test_process_faults.py)."""

from __future__ import annotations

import os
import signal

from compressor.plugin import Artifact, MeasureSettings, hookimpl


@hookimpl(tryfirst=True)
def compressor_open_runtime(artifact: Artifact, settings: MeasureSettings) -> None:
    if artifact.backend == "toy":
        os.kill(os.getpid(), signal.SIGKILL)
