"""Work that crashes natively or runs out of memory ends as one line naming the step:
run_in_fork for native code (a quantizer under ``ulimit -v``), and a step's MemoryError
in the run itself (exit 2, not a failed step)."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_core_run import invoke

from compressor import CompressionError, UsageError, hookimpl
from compressor.children import run_in_fork


def segfault() -> None:
    import ctypes

    ctypes.string_at(0)


def allocate_past_a_limit(limit_bytes: int) -> bytes:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    mapped = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (mapped + limit_bytes, hard))
    return bytes(bytearray(4 * limit_bytes))


def wrapped_memory_error() -> None:
    try:
        np.ones((1 << 20, 1 << 20, 1 << 10), dtype=np.float32)  # 4 PiB: numpy's own MemoryError
    except Exception as error:  # noqa: BLE001 - as backends do: their own error, from None
        raise CompressionError(f"fp16 conversion failed ({error})") from None


def test_the_result_comes_back_and_errors_keep_their_class() -> None:
    assert run_in_fork(np.arange, 5, step="quantize int8").tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(CompressionError, match="pruning every weight") as raised:
        run_in_fork(lambda: (_ for _ in ()).throw(CompressionError("pruning every weight", "m.onnx")), step="s")
    assert raised.value.path == Path("m.onnx")


def test_a_native_crash_is_a_one_line_compression_error() -> None:
    with pytest.raises(CompressionError) as raised:
        run_in_fork(segfault, step="quantize int8")
    message = str(raised.value)
    assert "'quantize int8'" in message and "SIGSEGV" in message and "\n" not in message
    assert raised.value.exit_code == 7


@pytest.mark.parametrize("function, arguments", [(allocate_past_a_limit, (64 << 20,)),
                                                 (wrapped_memory_error, ())])
def test_out_of_memory_in_the_child_is_a_usage_error_naming_the_step(function, arguments) -> None:
    with pytest.raises(UsageError) as raised:
        run_in_fork(function, *arguments, step="quantize fp16")
    assert str(raised.value).startswith("out of memory while applying 'quantize fp16'")
    assert raised.value.exit_code == 2


def test_a_crash_under_an_address_space_limit_is_out_of_memory(tmp_path: Path) -> None:
    """``ulimit -v``: native code that does not check its allocations segfaults."""
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 40, resource.RLIM_INFINITY))\n"
        "from compressor.children import run_in_fork\n"
        "from compressor.errors import CompressorError\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_process_faults import segfault\n"
        "try:\n    run_in_fork(segfault, step='quantize int8')\n"
        "except CompressorError as error:\n    print(error.exit_code, error)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    code, _, message = done.stdout.strip().partition(" ")
    assert code == "2" and message.startswith("out of memory while applying 'quantize int8'"), done.stdout
    assert "ulimit -v" in message and "SIGSEGV" in message


class OutOfMemoryFp16:
    """A backend's fp16 step that runs out of memory and wraps it in its own error."""

    @hookimpl(tryfirst=True)
    def compressor_compress(self, model, step, context):
        if step.mode == "fp16":
            wrapped_memory_error()


def test_a_step_out_of_memory_stops_the_run_with_exit_2_naming_it(toy_host, toy_model, tmp_path) -> None:
    toy_host.register(OutOfMemoryFp16(), name="oom")
    try:
        result = invoke("run", toy_model["model"], "-q", "fp16", "--min-seconds", "0", "-o", tmp_path / "out")
    finally:
        toy_host.unregister("oom")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: out of memory while applying 'quantize fp16'")
    assert not (tmp_path / "out").exists()


def test_a_measuring_process_killed_by_sigkill_is_out_of_memory_exit_2(toy_host, toy_model, tmp_path) -> None:
    from conftest import registered

    with registered("sigkilled_runtime", "sigkilled"):
        result = invoke("run", toy_model["model"], "-q", "fp16", "--min-seconds", "0", "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "out of memory while measuring" in lines[0] and "SIGKILL" in lines[0], lines
    assert str(toy_model["model"]) in lines[0] and not (tmp_path / "out").exists()
