"""The cache across runs: a rerun with one more variant makes and measures only that one;
entries are checked before they are trusted; --no-cache, a size cap, cache info|clear."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import counting_backend
import pytest
from click.testing import CliRunner
from conftest import registered
from counting_backend import write_count

from compressor import cache
from compressor.cli import cli

FAST = ("--min-seconds", "0", "--no-space-check", "--quiet")
MEASURED = ("latency_ms", "load_ms", "agreement", "size_bytes", "measure_seconds")


@pytest.fixture
def counting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, ...]]]:
    monkeypatch.setenv(cache.CACHE_SWITCH_VARIABLE, "on")
    monkeypatch.setenv(cache.CACHE_DIR_VARIABLE, str(tmp_path / "cache"))
    with registered("counting_backend", "counting"):
        counting_backend.CALLS.clear()
        yield counting_backend.CALLS


def run(files: dict[str, Path], out: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    result = CliRunner().invoke(cli, ["run", str(files["model"]), "--data", str(files["data"]), "-o", str(out),
                                      "--force", *FAST, *args])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return result.exit_code, report, result.output


def compresses(calls: list[tuple[str, ...]]) -> list[str]:
    return [call[1] for call in calls if call[0] == "compress"]


def variant(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in report["variants"] if v["name"] == name)


def test_a_rerun_with_one_more_variant_makes_and_measures_only_that_one(
        counting: list[tuple[str, ...]], tmp_path: Path) -> None:
    files = write_count(tmp_path / "in")
    code, first, _ = run(files, tmp_path / "first", "-q", "fp16", "-q", "int8")
    assert code == 0 and compresses(counting) == ["quantize fp16", "quantize int8"]
    counting.clear()
    recipe = tmp_path / "more.toml"
    recipe.write_text('[variants.pruned]\nsteps = ["prune 0.5"]\n')
    code, second, _ = run(files, tmp_path / "second", "-q", "fp16", "-q", "int8", "--recipe", str(recipe))
    assert code == 0
    assert compresses(counting) == ["prune 0.5"]
    for name in ("fp16", "int8"):
        before, after = variant(first, name), variant(second, name)
        assert after["notes"][:len(before["notes"])] == before["notes"]
        assert any(note.startswith("cached: made in an earlier run") for note in after["notes"])
        assert any(note.startswith("cached: measured in an earlier run on this machine") for note in after["notes"])
        assert {key: after["metrics"][key] for key in MEASURED} == {key: before["metrics"][key] for key in MEASURED}
        assert (tmp_path / "second" / after["artifact"]).read_bytes() == \
            (tmp_path / "first" / before["artifact"]).read_bytes()
    assert not any(note.startswith("cached") for note in variant(second, "pruned").get("notes", []))
    # The original is made again (its conversion is what the keys hold) and its measurement reused.
    original = variant(second, "original")
    assert any(note.startswith("cached: measured in an earlier run") for note in original["notes"])
    assert original["metrics"]["latency_ms"] == variant(first, "original")["metrics"]["latency_ms"]


def test_no_cache_and_changed_inputs_make_everything_again(counting: list[tuple[str, ...]], tmp_path: Path) -> None:
    files = write_count(tmp_path / "in")
    assert run(files, tmp_path / "out", "-q", "fp16")[0] == 0
    counting.clear()
    assert run(files, tmp_path / "out", "-q", "fp16", "--no-cache")[0] == 0
    assert compresses(counting) == ["quantize fp16"]
    counting.clear()
    other = write_count(tmp_path / "other", features=17)  # other model bytes: another key
    assert run(other, tmp_path / "out", "-q", "fp16")[0] == 0
    assert compresses(counting) == ["quantize fp16"]
    counting.clear()
    assert run(files, tmp_path / "out", "-q", "fp16")[0] == 0  # and the first one is still there
    assert compresses(counting) == []
    # The backend's code edited (a source checkout, the same version): made again.
    source = Path(counting_backend.__file__)
    times = source.stat()
    try:
        os.utime(source, ns=(times.st_atime_ns, times.st_mtime_ns + 1_000_000_000))
        assert run(files, tmp_path / "out", "-q", "fp16")[0] == 0
    finally:
        os.utime(source, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert compresses(counting) == ["quantize fp16"]


def test_an_altered_or_partial_entry_is_not_trusted(counting: list[tuple[str, ...]], tmp_path: Path) -> None:
    files = write_count(tmp_path / "in")
    code, first, _ = run(files, tmp_path / "first", "-q", "fp16")
    assert code == 0
    # The artifact and the measurement are entries; tamper with every .dial in the cache.
    entries = tmp_path / "cache" / "entries"
    made = (tmp_path / "first" / "fp16.dial").read_bytes()
    tampered = [path for path in entries.rglob("*.dial")]
    assert tampered
    for path in tampered:
        path.write_bytes(path.read_bytes()[:-4] + b"XXXX")
    counting.clear()
    code, second, _ = run(files, tmp_path / "second", "-q", "fp16")
    assert code == 0 and compresses(counting) == ["quantize fp16"]
    # Made again, to the same bytes: their measurement (keyed by those bytes) is still good.
    assert not any(note.startswith("cached: made") for note in variant(second, "fp16")["notes"])
    assert (tmp_path / "second" / "fp16.dial").read_bytes() == made
    # A symlink planted where an entry's file was is refused, not followed.
    for path in entries.rglob("*.dial"):
        path.unlink()
        os.symlink(tmp_path / "second" / "fp16.dial", path)
    counting.clear()
    assert run(files, tmp_path / "third", "-q", "fp16")[0] == 0
    assert compresses(counting) == ["quantize fp16"]


def test_another_machine_reuses_the_artifact_but_measures_again(
        counting: list[tuple[str, ...]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from compressor import run_cache

    files = write_count(tmp_path / "in")
    assert run(files, tmp_path / "out", "-q", "fp16")[0] == 0
    monkeypatch.setattr(run_cache, "machine", lambda: {"cpu": "another", "cores": 64, "usable_cpus": 64,
                                                       "flags": [], "arch": "x"})
    counting.clear()
    code, report, _ = run(files, tmp_path / "out", "-q", "fp16")
    assert code == 0 and compresses(counting) == []
    notes = variant(report, "fp16")["notes"]
    assert any(note.startswith("cached: made") for note in notes)
    assert not any(note.startswith("cached: measured") for note in notes + variant(report, "original")["notes"])


def test_the_size_cap_evicts_the_least_recently_used_and_info_clear(
        counting: list[tuple[str, ...]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = cache.Cache()
    for index, key in enumerate(("old", "used", "new")):
        source = tmp_path / f"{key}.bin"
        source.write_bytes(bytes(1000))
        assert store.put(key, {"index": index}, {"file.bin": source})
        os.utime(store.entries / key, (1000 + index, 1000 + index))
    assert store.get("used") is not None  # used now: the most recent
    monkeypatch.setenv(cache.MAX_BYTES_VARIABLE, "1500")  # one entry (1000 bytes and its entry.json)
    assert store.evict() > 0
    assert sorted(key for key, _, _ in store.listing()) == ["used"]
    info = CliRunner().invoke(cli, ["cache", "info"])
    assert info.exit_code == 0 and str(store.root) in info.output and "entries: 1," in info.output
    cleared = CliRunner().invoke(cli, ["cache", "clear"])
    assert cleared.exit_code == 0 and "removed 1 entries" in cleared.output
    assert store.listing() == []
    monkeypatch.setenv(cache.MAX_BYTES_VARIABLE, "lots")
    assert CliRunner().invoke(cli, ["cache", "info"]).exit_code == 2
    files = write_count(tmp_path / "in")
    code, _, output = run(files, tmp_path / "out", "-q", "fp16")
    assert code == 2 and "COMPRESSOR_CACHE_MAX_BYTES='lots'" in output
    assert counting == [] and not (tmp_path / "out").exists()  # refused before any work


def test_an_onnx_model_whose_external_weights_changed_is_made_again(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from onnx_fixtures import write_external_mlp

    monkeypatch.setenv(cache.CACHE_SWITCH_VARIABLE, "on")
    monkeypatch.setenv(cache.CACHE_DIR_VARIABLE, str(tmp_path / "cache"))
    model, data = write_external_mlp(tmp_path / "in", seed=0)
    files = {"model": model, "data": data}
    graph, kept_data = model.read_bytes(), data.read_bytes()
    assert run(files, tmp_path / "first", "-q", "fp16")[0] == 0
    other, _ = write_external_mlp(tmp_path / "other", seed=1)
    weights = model.with_name("mlp.onnx.data")
    before = weights.read_bytes()
    weights.write_bytes(other.with_name("mlp.onnx.data").read_bytes())  # other weights; the same mlp.onnx
    assert model.read_bytes() == graph and data.read_bytes() == kept_data
    assert len(weights.read_bytes()) == len(before) and weights.read_bytes() != before
    code, report, _ = run(files, tmp_path / "second", "-q", "fp16")
    assert code == 0
    assert not any(note.startswith("cached") for note in variant(report, "fp16")["notes"])
    assert (tmp_path / "second" / "fp16.onnx").read_bytes() != (tmp_path / "first" / "fp16.onnx").read_bytes()
    code, report, _ = run(files, tmp_path / "third", "-q", "fp16")  # unchanged since: reused
    assert code == 0 and any(note.startswith("cached: made") for note in variant(report, "fp16")["notes"])
    # What the cache holds is a copy: onnx refuses external data with a second hard link.
    import onnx

    for out in ("first", "second", "third"):
        for path in (tmp_path / out).rglob("*"):
            assert path.is_dir() or path.stat().st_nlink == 1, path
        for path in (tmp_path / out).glob("*.onnx"):
            onnx.load(str(path))
