"""Each thing once: the variants' steps form a tree, a shared prefix is computed once and
forked, and every variant reports what making it on its own reports."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import counting_backend
import pytest
from click.testing import CliRunner
from conftest import registered
from counting_backend import write_count

from compressor.cli import cli
from compressor.models import Step
from compressor.plugin import hookimpl
from compressor.recipes import Variant
from compressor.step_tree import build, count_steps, step_key

FAST = ("--min-seconds", "0", "--no-space-check")


@pytest.fixture
def counting() -> Iterator[list[tuple[str, ...]]]:
    with registered("counting_backend", "counting"):
        counting_backend.CALLS.clear()
        counting_backend.FORKS = True
        yield counting_backend.CALLS
        counting_backend.FORKS = True


def run(files: dict[str, Path], out: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(cli, ["run", str(files["model"]), "--data", str(files["data"]), "-o", str(out),
                                      "--quiet", *FAST, *args])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return result.exit_code, report


def write_recipe(path: Path, variants: dict[str, list[str]]) -> None:
    path.write_text("".join(f"[variants.{name}]\nsteps = {json.dumps(steps)}\n" for name, steps in variants.items()))


def compresses(calls: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    return [call[1:] for call in calls if call[0] == "compress"]


def what_is_reported(report: dict[str, Any], name: str) -> tuple[Any, ...]:
    variant = next(v for v in report["variants"] if v["name"] == name)
    # Timings and peaks (an export's seconds) differ from run to run: every other fact is compared.
    facts = {key: value for key, value in variant["metadata"].items() if "seconds" not in key and "peak" not in key}
    return variant["steps"], variant["notes"], facts, variant["artifact"], variant.get("error")


def test_steps_that_differ_in_anything_are_different_nodes() -> None:
    prune = Step("prune", {"sparsity": 0.5, "epochs": 1}, frozenset({"epochs"}))
    given = Step("prune", {"sparsity": 0.5, "epochs": 1})
    longer = Step("prune", {"sparsity": 0.5, "epochs": 2})
    fp16, int8 = Step("quantize", {"mode": "fp16"}), Step("quantize", {"mode": "int8"})
    assert step_key(prune) == step_key(Step("prune", {"epochs": 1, "sparsity": 0.5}, frozenset({"epochs"})))
    assert len({step_key(prune), step_key(given), step_key(longer)}) == 3
    tree = build([Variant("a", (prune, fp16)), Variant("b", (prune, int8)), Variant("c", (given, int8)),
                  Variant("d", (prune,)), Variant("e", (fp16,))])
    # prune (shared by a, b, d), fp16 and int8 under it; given and int8 under it; fp16 alone.
    assert count_steps(tree) == 6
    shared = tree.children[step_key(prune)]
    assert shared.under == [0, 1, 3] and shared.ending == [3]
    assert [child.under for child in shared.children.values()] == [[0], [1]]


def test_a_shared_prune_is_computed_once_and_each_variant_reports_as_if_alone(
        counting: list[tuple[str, ...]], tmp_path: Path) -> None:
    files = write_count(tmp_path / "in")
    code, together = run(files, tmp_path / "together", "--prune", "0.5", "-q", "fp16", "-q", "int8")
    assert code == 0, together
    assert compresses(counting) == [("prune 0.5",), ("quantize fp16", "prune 0.5"), ("quantize int8", "prune 0.5")]
    # One fork of the loaded model for the subtree, one of the pruned model for fp16 (int8 takes it over).
    assert [call for call in counting if call[0] == "fork"] == [("fork",), ("fork", "prune 0.5")]
    for name in ("prune0.5-fp16", "prune0.5-int8"):
        counting.clear()
        mode = name.rsplit("-", 1)[1]
        code, alone = run(files, tmp_path / f"alone-{mode}", "--prune", "0.5", "-q", mode)
        assert code == 0 and len(compresses(counting)) == 2
        assert what_is_reported(together, name) == what_is_reported(alone, name)
        artifact = what_is_reported(alone, name)[3]
        assert (tmp_path / "together" / artifact).read_bytes() == (tmp_path / f"alone-{mode}" / artifact).read_bytes()
        assert next(v for v in together["variants"] if v["name"] == name)["metrics"]["compress_seconds"] > 0


def test_a_failed_shared_step_fails_every_variant_under_it_each_named(
        counting: list[tuple[str, ...]], tmp_path: Path) -> None:
    files = write_count(tmp_path / "in")
    recipe = tmp_path / "study.toml"
    write_recipe(recipe, {"all-fp16": ["prune 1.0", "quantize fp16"], "all-int8": ["prune 1.0", "quantize int8"],
                          "quarter-fp16": ["prune 0.25", "quantize fp16"], "quarter": ["prune 0.25"]})
    code, report = run(files, tmp_path / "out", "--recipe", str(recipe))
    assert code == 7
    assert compresses(counting).count(("prune 1",)) == 1
    by_name = {variant["name"]: variant for variant in report["variants"]}
    for name in ("all-fp16", "all-int8"):
        assert "ValueError at step 'prune 1': pruning every weight leaves nothing" in by_name[name]["error"]
        assert not by_name[name]["artifact"]
    for name in ("quarter-fp16", "quarter"):  # a sibling subtree is made
        assert by_name[name].get("error") is None and (tmp_path / "out" / by_name[name]["artifact"]).is_file()


@pytest.mark.parametrize("forks", [False, "loaded only"])
def test_without_forks_each_variant_makes_its_prefix_again(counting: list[tuple[str, ...]], tmp_path: Path,
                                                           forks: bool | str) -> None:
    files = write_count(tmp_path / "in")
    code, forked = run(files, tmp_path / "forked", "--prune", "0.5", "-q", "fp16", "-q", "int8")
    assert code == 0
    counting.clear()
    counting_backend.FORKS = forks
    code, loaded = run(files, tmp_path / "loaded", "--prune", "0.5", "-q", "fp16", "-q", "int8")
    assert code == 0
    # fp16 needs a copy of the pruned model, which a backend without forks cannot give: pruned again.
    assert compresses(counting) == [("prune 0.5",), ("prune 0.5",), ("quantize fp16", "prune 0.5"),
                                    ("quantize int8", "prune 0.5")]
    for name in ("prune0.5-fp16", "prune0.5-int8"):
        assert what_is_reported(forked, name) == what_is_reported(loaded, name)


def test_different_parameters_are_not_shared(counting: list[tuple[str, ...]], tmp_path: Path) -> None:
    files = write_count(tmp_path / "in")
    recipe = tmp_path / "study.toml"
    write_recipe(recipe, {"a": ["prune 0.5", "quantize fp16"], "b": ["prune 0.5 epochs=2", "quantize fp16"],
                          "c": ["prune 0.5 epochs=1", "quantize int8"], "d": ["prune 0.5", "quantize int8"]})
    code, report = run(files, tmp_path / "out", "--recipe", str(recipe))
    assert code == 0, report
    # a and d share the defaulted prune; b (epochs=2) and c (epochs=1 given) have their own.
    assert [call for call in compresses(counting) if call[0].startswith("prune")] == [
        ("prune 0.5",), ("prune 0.5 epochs=2",), ("prune 0.5 epochs=1",)]
    assert len(compresses(counting)) == 7


class _Spy:
    """Counts the onnx backend's compress calls (returns None: the backend does the work)."""

    def __init__(self) -> None:
        self.steps: list[str] = []

    @hookimpl
    def compressor_compress(self, model: Any, step: Step, context: Any) -> None:
        self.steps.append(str(step))


def test_onnx_prunes_once_for_two_quantize_modes_with_the_same_files(tmp_path: Path) -> None:
    from onnx_fixtures import make_digits_files

    from compressor.plugins import get_host

    digits = make_digits_files(tmp_path / "in")
    files = {"model": digits.onnx, "data": digits.eval}
    host, spy = get_host(), _Spy()
    host.register(spy, name="step-spy")
    try:
        code, together = run(files, tmp_path / "together", "--prune", "0.5", "-q", "dynamic", "-q", "fp16",
                             "--max-examples", "64")
        assert code == 0, together
        assert sorted(spy.steps) == ["prune 0.5", "quantize dynamic", "quantize fp16"]
        for mode in ("dynamic",):  # dynamic starts from a fork of the pruned model (fp16 takes it over)
            code, alone = run(files, tmp_path / mode, "--prune", "0.5", "-q", mode, "--max-examples", "64")
            assert code == 0, alone
            name = f"prune0.5-{mode}"
            assert what_is_reported(together, name) == what_is_reported(alone, name)
            artifact = what_is_reported(alone, name)[3]
            assert (tmp_path / "together" / artifact).read_bytes() == (tmp_path / mode / artifact).read_bytes()
    finally:
        host.unregister(name="step-spy")
