"""Joining a Ray cluster, or starting and stopping the local one a run owns.

* **Joining** (``--ray-address``): the address is reached with plain TCP first, retried
  until ``--ray-timeout`` (default 30 s) runs out; an address that cannot be reached is
  one line, exit 2, instead of Ray retrying for minutes and printing native log lines.
  Ray's own handshake after that is bounded by Ray (about 30 s more at most when
  something that is not Ray answers there).
* **A local Ray** lives in a scratch folder ``compressor-ray-<pid>-xxxx`` (locked by the
  run like every scratch folder, see :mod:`compressor.scratch`). It is shut down and its
  folder removed when the run ends, however it ends: normally, by an error, Ctrl-C or
  SIGTERM (the run's own signal handlers are put back after Ray installs its own), and
  after a SIGKILL by a small reaper process that waits for the run's end, or else by the
  next run, which stops what is left of a stale cluster before removing its folder.
* Ray's native chatter while starting, joining and stopping goes to a scratch file.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from compressor import scratch
from compressor.errors import CompressorError, UnsupportedError, UsageError, first_line

#: Seconds to reach a cluster given with ``--ray-address`` (``--ray-timeout``).
DEFAULT_TIMEOUT = 30.0
#: Ray's socket paths (``<temp>/session_<date>_<pid>/sockets/plasma_store``) must stay under
#: 108 bytes: a longer ``$TMPDIR`` is not used for a local Ray's folder, ``/tmp`` is.
_LONGEST_RAY_ROOT = 40
_GCS_PORT, _CLIENT_PORT = 6379, 10001


def ray_roots() -> list[Path]:
    """Where a local Ray's folder may be: ``$TMPDIR`` when short enough, and ``/tmp``."""
    roots = [scratch.scratch_root()] if len(str(scratch.scratch_root())) <= _LONGEST_RAY_ROOT else []
    return list(dict.fromkeys([*roots, Path("/tmp")]))


class LocalRay:
    """A Ray started for one run: its folder, and the reaper that cleans up after a SIGKILL."""

    def __init__(self) -> None:
        roots = ray_roots()
        for root in roots:
            scratch.remove_stale(root, (scratch.RAY,))
        try:
            self.folder = scratch.make_folder(scratch.RAY, roots[0])
        except OSError as error:
            raise scratch.tmpdir_error(roots[0], error) from None
        self._reaper: subprocess.Popen[bytes] | None = None
        try:
            self._reaper = _start_reaper(self.folder)
        except OSError:
            self._reaper = None  # the next run cleans up instead

    def close(self) -> None:
        scratch.stop_users(self.folder)
        scratch.remove_folder(self.folder)
        # What the cluster's workers left in $TMPDIR when shutdown killed them mid-task.
        scratch.remove_stale()
        if self._reaper is not None:
            assert self._reaper.stdin is not None
            self._reaper.stdin.close()  # it finds the folder gone and exits
            try:
                self._reaper.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
                self._reaper.wait()


def _start_reaper(folder: Path) -> subprocess.Popen[bytes]:
    from compressor.children import child_environment, python_command

    return subprocess.Popen(
        python_command("compressor.scratch", [str(folder)]), stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/", env=child_environment(),
        start_new_session=True,  # a Ctrl-C to the terminal's process group is not for it
    )


def init(ray: Any, address: str | None, timeout: float, options: dict[str, Any],
         local_options: dict[str, Any]) -> LocalRay | None:
    """``ray.init`` for a run: a local Ray (``address`` None or ``local``, with
    ``local_options`` too; returned so the run can stop it) or the cluster at ``address``,
    reached within ``timeout`` seconds."""
    local = address is None or address == "local"
    started = LocalRay() if local else None
    try:
        if started is not None:
            with quiet_ray():
                ray.init(address="local", _temp_dir=str(started.folder), **options, **local_options)
            return started
        assert address is not None
        deadline = time.monotonic() + timeout
        reach(address, timeout)
        with quiet_ray(), _ray_retries(deadline - time.monotonic()):
            ray.init(address=address, **options)
        return None
    except BaseException as error:
        if started is not None:
            stop(ray, started)
        elif ray.is_initialized():
            with quiet_ray():
                ray.shutdown()
        if isinstance(error, CompressorError) or not isinstance(error, Exception):
            raise
        if started is not None:
            raise UnsupportedError(f"could not start a local Ray ({first_line(error)})") from None
        raise UsageError(f"could not join the Ray cluster at --ray-address {address} "
                         f"({first_line(error)})") from None


def stop(ray: Any, started: LocalRay | None) -> None:
    """Shut Ray down when this run started it, and remove what it left."""
    if started is None:
        return
    try:
        with quiet_ray():
            ray.shutdown()
    finally:
        started.close()


def reach(address: str, timeout: float) -> None:
    """Connect to ``address`` with TCP until it answers or ``timeout`` seconds pass."""
    host, port = endpoint(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=max(0.1, min(5.0, deadline - time.monotonic()))).close()
            return
        except socket.gaierror as error:
            raise UsageError(f"--ray-address {address}: unknown host {host!r} ({error.strerror})") from None
        except OSError as error:
            problem = error.strerror or type(error).__name__
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UsageError(f"cannot reach the Ray cluster at --ray-address {address} within "
                             f"{timeout:g} s ({host}:{port}: {problem}); check the address, or "
                             "allow more time with --ray-timeout")
        time.sleep(min(0.5, remaining))


def endpoint(address: str) -> tuple[str, int]:
    """The host and port a Ray address connects to: ``HOST[:PORT]`` (GCS, 6379),
    ``ray://HOST[:PORT]`` (Ray Client, 10001), ``auto`` (the cluster ``ray start`` made here)."""
    from urllib.parse import urlsplit

    text = address.strip()
    if text == "auto":
        text = _auto_address(address)
    default = _GCS_PORT
    if text.startswith("ray://"):
        text, default = text[len("ray://"):], _CLIENT_PORT
    usage = UsageError(f"--ray-address {address!r} is not auto, HOST:PORT or ray://HOST:PORT")
    if "://" in text or "/" in text:
        raise usage
    try:
        parts = urlsplit("//" + text)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise usage from None
    if not host:
        raise usage
    return host, port or default


def _auto_address(address: str) -> str:
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # a Ray without it: let ray.init find the cluster
        raise UsageError("--ray-address auto: this Ray cannot tell where its cluster is; "
                         "give HOST:PORT") from None
    try:
        found = canonicalize_bootstrap_address(address)
    except Exception as error:  # noqa: BLE001 - ConnectionError when no cluster runs here
        raise UsageError(f"--ray-address auto: no running Ray cluster found ({first_line(error)})") from None
    if not found:
        raise UsageError("--ray-address auto: no running Ray cluster found (start one with `ray start --head`)")
    return str(found)


@contextmanager
def _ray_retries(seconds: float) -> Iterator[None]:
    """Ray's Python-side retries to reach the cluster's GCS (one attempt takes up to ~35 s):
    as many as ``seconds`` allows, at least one, unless the user chose their number."""
    name = "RAY_gcs_server_port_wait_time_s"
    if name in os.environ:
        yield
        return
    os.environ[name] = str(max(1, round(seconds / 30)))
    try:
        yield
    finally:
        os.environ.pop(name, None)


@contextmanager
def quiet_ray() -> Iterator[None]:
    """Ray's native output silenced, and this process's signal handlers (SIGINT, SIGTERM,
    SIGHUP) put back afterwards: Ray installs its own, which dump a native stack and exit 1."""
    from compressor.native import native_output_silenced

    with _signals_kept(), native_output_silenced():
        yield


@contextmanager
def _signals_kept() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = [name for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
    saved = {name: signal.getsignal(getattr(signal, name)) for name in names}
    try:
        yield
    finally:
        for name, handler in saved.items():
            if handler is not None:
                signal.signal(getattr(signal, name), handler)
