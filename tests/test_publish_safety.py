"""Publishing into --out: every write goes to a name compressor created, and the new set
replaces the old one all or nothing.

Links planted at output names (``best.<ext>``, an artifact, a report) are replaced, never
written through; variant names that are paths are refused wherever variants come from; a
full disk (ENOSPC at the filesystem call) or a file size limit (a real ``ulimit -f``) while
publishing leaves the previous results exactly as they were, with one line and exit 2.
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import snapshot
from search_backend import write_dial

import compressor
from compressor import UsageError, hookimpl
from compressor.cli import cli
from compressor.recipes import Variant, parse_step
from compressor.runner import RunRequest

TESTS = Path(__file__).resolve().parent
QUICK_SPACE = '[search.stages]\nquantize = ["none", "quantize fp16"]\n'


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def plant(out: Path, name: str, kind: str, victim: Path) -> None:
    """``out/name`` as a symlink or a hard link to ``victim``, a file outside ``out``."""
    out.mkdir(exist_ok=True)
    if kind == "symlink":
        (out / name).symlink_to(victim)
    else:
        os.link(victim, out / name)


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_search_replaces_a_link_at_best_and_never_writes_through_it(dial_host, tmp_path: Path, kind: str) -> None:
    files = write_dial(tmp_path / "in")
    space = tmp_path / "space.toml"
    space.write_text(QUICK_SPACE)
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file")
    out = tmp_path / "out"
    plant(out, "best.dial", kind, victim)
    result = invoke("search", files["model"], "--data", files["data"], "--space", space, "--max-accuracy-drop", 5,
                    "--min-seconds", 0, "--force", "-o", out)
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "the user's own file"
    best = out / "best.dial"
    assert not best.is_symlink() and best.read_bytes() == (out / "fp16.dial").read_bytes()
    assert os.stat(victim).st_nlink == 1  # the planted hard link was moved aside and removed, not reused


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
@pytest.mark.parametrize("name", ["fp16.toy", "report.json"])
def test_run_replaces_a_link_at_an_output_name(toy_host, toy_model, tmp_path: Path, kind: str, name: str) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file")
    out = tmp_path / "out"
    plant(out, name, kind, victim)
    result = invoke("run", toy_model["model"], "-q", "fp16", "--data", toy_model["eval"], "--min-seconds", 0,
                    "--force", "-o", out)
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "the user's own file"
    assert not (out / name).is_symlink() and (out / name).stat().st_ino != victim.stat().st_ino


@pytest.mark.parametrize("name", ["/abs/victim", "../victim", "a/b", "x" * 300, "", "..", "best", "CON", "report"])
def test_api_variant_names_that_are_not_one_file_name_are_refused(toy_host, toy_model, tmp_path: Path,
                                                                  name: str) -> None:
    victim = tmp_path / "victim"
    victim.write_text("mine")
    if name.startswith("/abs"):
        name = str(victim)
    out = tmp_path / "work" / "out"
    with pytest.raises(UsageError, match="variant name"):
        compressor.run(toy_model["model"], {name: "quantize fp16"}, out=out, min_seconds=0)
    assert victim.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["inputs", "victim"]


def test_variants_made_in_python_are_checked_too(toy_host, toy_model, tmp_path: Path) -> None:
    """A RunRequest built by hand (not through recipes or the API's parsing) is checked by the session."""
    from compressor.plugins import get_host
    from compressor.runner import run

    request = RunRequest(model=toy_model["model"], out=tmp_path / "out",
                         variants=[Variant("../escaped", (parse_step("quantize fp16"),))])
    with pytest.raises(UsageError, match="variant name"):
        run(request, get_host())
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped.toy").exists()


def full_disk_at(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """ENOSPC from fsync of any file whose name holds ``name``: what a full disk reports for
    data the filesystem accepted into its cache but cannot place."""
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        if name in os.readlink(f"/proc/self/fd/{descriptor}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("failing", ["fp16.toy", "report.html", "report.png"])
def test_a_full_disk_while_publishing_leaves_the_previous_results(
        toy_host, toy_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    out = tmp_path / "out"
    assert invoke("run", toy_model["model"], "-q", "fp16", "--data", toy_model["eval"], "--min-seconds", 0,
                  "-o", out).exit_code == 0
    before = snapshot(out)
    assert failing in before
    full_disk_at(monkeypatch, failing)
    result = invoke("run", toy_model["model"], "-q", "fp16", "-q", "dynamic", "--data", toy_model["eval"],
                    "--min-seconds", 0, "--force", "-o", out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and "nothing in --out was changed" in lines[0]
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)


def test_a_failed_rename_while_publishing_puts_everything_back(
        toy_host, toy_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    assert invoke("run", toy_model["model"], "-q", "fp16", "--data", toy_model["eval"], "--min-seconds", 0,
                  "-o", out).exit_code == 0
    before = snapshot(out)
    real_replace = os.replace
    failed: list[object] = []

    def replace(source: object, target: object) -> None:
        if Path(str(target)) == out / "report.md" and not failed:  # once: putting it back works
            failed.append(source)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    result = invoke("run", toy_model["model"], "-q", "dynamic", "--data", toy_model["eval"], "--min-seconds", 0,
                    "--force", "-o", out)
    assert result.exit_code == 2 and "previous contents are put back" in result.stderr
    assert snapshot(out) == before


BOOTSTRAP = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import toy_backend; "
             "from compressor.plugins import get_host; get_host().register(toy_backend, name='toy'); "
             "from compressor.cli import main; sys.argv[0] = 'compressor'; main()")


def test_a_file_size_limit_while_publishing_is_one_line_and_keeps_the_previous_results(
        toy_host, toy_model, tmp_path: Path) -> None:
    """A real ``ulimit -f`` (RLIMIT_FSIZE): the reports do not fit, the artifacts do."""
    out = tmp_path / "out"
    assert invoke("run", toy_model["model"], "-q", "fp16", "--data", toy_model["eval"], "--min-seconds", 0,
                  "-o", out).exit_code == 0
    before = snapshot(out)
    assert max(len(data) for name, data in before.items() if name.endswith(".toy")) < 8000
    assert len(before["report.html"]) > 8000

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    result = subprocess.run(
        [sys.executable, "-c", BOOTSTRAP, "run", str(toy_model["model"]), "-q", "fp16", "-q", "dynamic", "--data",
         str(toy_model["eval"]), "--min-seconds", "0", "--force", "-o", str(out)],
        capture_output=True, text=True, timeout=300, preexec_fn=limited,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "File too large" in lines[0] and "ulimit -f" in lines[0], result.stderr
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)


def test_an_out_name_too_long_for_the_filesystem_is_one_line(toy_host, toy_model, tmp_path: Path) -> None:
    result = invoke("run", toy_model["model"], "-q", "fp16", "-o", tmp_path / ("x" * 300))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "File name too long" in lines[0] and "Traceback" not in result.output


class InterruptsTheSecondBackend:
    """Ctrl-C while the second backend saves: the first backend's run has finished by then."""

    @hookimpl(wrapper=True)
    def compressor_save(self, model, destination, context):
        artifact = yield
        if model.backend == "dial2":
            raise KeyboardInterrupt
        return artifact


def test_a_run_on_several_backends_is_published_all_or_nothing(tmp_path: Path) -> None:
    from conftest import registered

    files = write_dial(tmp_path / "in")
    out = tmp_path / "out"
    command = ["run", files["model"], "--backend", "dial,dial2", "-q", "int8", "--data", files["data"],
               "--min-seconds", 0, "-o", out]
    with registered("search_backend", "dial"), registered("second_dial", "dial2") as host:
        assert invoke(*command).exit_code == 0
        before = snapshot(out)
        assert "dial/int8.dial" in before and "dial2/int8.dial" in before
        host.register(InterruptsTheSecondBackend(), name="interrupt")
        try:
            result = invoke(*command[:5], "fp16", *command[6:], "--force")
        finally:
            host.unregister("interrupt")
    assert result.exit_code == 130, result.output
    assert snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted({name.split("/")[0] for name in before})
