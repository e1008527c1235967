"""compressor search on a deterministic NumPy backend: budget respected, work skipped
where it cannot win, the same trials for the same seed, a reproducing recipe, exit 6."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from fasttext_fixtures import FastTextFiles, ft  # noqa: F401 - ft is a fixture
from search_backend import write_dial

from compressor.cli import cli


def search(files: dict[str, Path], out: Path, *args: object) -> Any:
    return CliRunner().invoke(cli, ["search", str(files["model"]), "--data", str(files["data"]),
                                    "--min-seconds", "0", "-o", str(out), *map(str, args)])


def trials(out: Path) -> list[dict[str, Any]]:
    report = json.loads((out / "report.json").read_text())
    return [{"name": v["name"], **v["metadata"]["search"], "size": v["metrics"].get("size_bytes"),
             "accuracy": v["metrics"].get("accuracy"), "failures": v["budget_failures"]}
            for v in report["variants"]]


def test_the_winner_is_within_budget_and_reproducible(dial_host, tmp_path: Path) -> None:
    files = write_dial(tmp_path / "in")
    out = tmp_path / "out"
    result = search(files, out, "--max-accuracy-drop", 2, "--max-trials", 10)
    assert result.exit_code == 0, result.output
    found = trials(out)
    winner = [t for t in found if t["winner"]]
    assert len(winner) == 1 and not winner[0]["failures"] and winner[0]["accuracy"] >= 0.98
    measured = [t for t in found[1:] if t["state"] == "measured" and not t["failures"]]
    assert all(winner[0]["size"] <= t["size"] for t in measured)
    assert any(t["state"] == "skipped" and "at least as strict as" in t["reason"] for t in found)
    best = out / "best.dial"
    assert best.read_bytes() == (out / f"{winner[0]['name'].replace('.', '_')}.dial").read_bytes()
    rerun = CliRunner().invoke(cli, ["run", str(files["model"]), "--recipe", str(out / "recipe.toml"),
                                     "--data", str(files["data"]), "--min-seconds", "0", "-o", str(tmp_path / "re")])
    assert rerun.exit_code == 0, rerun.output
    variants = json.loads((tmp_path / "re" / "report.json").read_text())["variants"]
    assert variants[1]["metrics"]["size_bytes"] == winner[0]["size"]


def test_the_same_seed_gives_the_same_trials(dial_host, tmp_path: Path) -> None:
    files = write_dial(tmp_path / "in")
    runs = []
    for name in ("a", "b"):
        assert search(files, tmp_path / name, "--max-accuracy-drop", 2, "--max-trials", 8,
                      "--seed", 3).exit_code == 0
        runs.append([(t["name"], t["state"]) for t in trials(tmp_path / name)])
    assert runs[0] == runs[1]


def test_it_finds_the_grid_best_with_half_the_work(dial_host, tmp_path: Path) -> None:
    """The floor of the issue: within 10% of the full grid's best, measuring at most half of it."""
    from compressor import search_space
    from compressor.recipes import Variant

    files = write_dial(tmp_path / "in")
    assert search(files, tmp_path / "s", "--max-accuracy-drop", 2, "--max-trials", 10).exit_code == 0
    found = trials(tmp_path / "s")
    winner = next(t for t in found if t["winner"])
    import search_backend

    stages = search_space.from_backend(next(iter(search_backend.compressor_backends())))
    grid = [search_space.variant(config, stages) for config in search_space.configurations(stages)]
    recipe = tmp_path / "grid.toml"
    recipe.write_text("".join(
        f'[variants."{v.name}"]\nsteps = [{", ".join(repr(str(s)).replace(chr(39), chr(34)) for s in v.steps)}]\n'
        for v in grid if isinstance(v, Variant)))
    full = CliRunner().invoke(cli, ["run", str(files["model"]), "--recipe", str(recipe), "--data", str(files["data"]),
                                    "--min-seconds", "0", "--max-accuracy-drop", "2", "-o", str(tmp_path / "g")])
    assert full.exit_code in (0, 6), full.output
    report = json.loads((tmp_path / "g" / "report.json").read_text())
    feasible = [v["metrics"]["size_bytes"] for v in report["variants"][1:] if not v["budget_failures"]]
    measured = sum(t["state"] == "measured" for t in found[1:])
    assert measured <= (len(grid) - 1) / 2, measured
    assert winner["size"] <= 1.10 * min(feasible), (winner, min(feasible))


def test_no_trial_within_budget_is_exit_6_naming_the_closest(dial_host, tmp_path: Path) -> None:
    files = write_dial(tmp_path / "in")
    out = tmp_path / "out"
    result = search(files, out, "--min-cosine", 1.0, "--max-trials", 6)
    assert result.exit_code == 6, result.output
    assert "no trial meets the budget; the closest is" in result.stderr
    assert (out / "report.json").is_file() and not (out / "best.dial").exists()


def test_the_space_can_come_from_a_recipe(dial_host, tmp_path: Path) -> None:
    files = write_dial(tmp_path / "in")
    space = tmp_path / "space.toml"
    space.write_text('[search.stages]\nquantize = ["none", "quantize fp16", "quantize int8"]\n')
    out = tmp_path / "out"
    result = search(files, out, "--space", space, "--max-accuracy-drop", 2)
    assert result.exit_code == 0, result.output
    assert sorted(t["name"] for t in trials(out)) == ["fp16", "int8", "original"]
    summary = json.loads((out / "report.json").read_text())["settings"]["search"]
    assert summary["space_size"] == 3 and summary["winner"] == "int8"


def test_search_from_python(dial_host, tmp_path: Path) -> None:
    import compressor

    files = write_dial(tmp_path / "in")
    report = compressor.search(files["model"], data=files["data"], max_accuracy_drop=2, max_trials=6,
                               min_seconds=0)
    winner = report.settings["search"]["winner"]
    assert report.best("size").name == winner
    assert (report.folder / "best.dial").is_file()
    report.cleanup()


def test_parameter_stages_of_one_technique_make_one_step() -> None:
    from compressor import Backend, Param, Technique, search_space

    backend = Backend("b", "", (), techniques={"pq": Technique("pq", params={
        "dsub": Param(int, 2, candidates=(2, 4, 8)),
        "qnorm": Param(bool, False, candidates=(True,)),
        "cutoff": Param(int, 0, candidates=({"cutoff": 1000, "retrain": True},)),
    })})
    stages = search_space.from_backend(backend)
    assert [stage.name for stage in stages] == ["pq.dsub", "pq.qnorm", "pq.cutoff"]
    variant = search_space.variant((2, 1, 1), stages)
    assert [str(step) for step in variant.steps] == ["pq dsub=4 qnorm=true cutoff=1000 retrain=true"]
    assert search_space.variant((0, 0, 0), stages) is None
    assert search_space.stricter((3, 1, 0), (2, 0, 0)) and not search_space.stricter((3, 0, 0), (2, 1, 0))


def test_a_clearly_failing_variant_is_stopped_on_a_subset(dial_host, tmp_path: Path) -> None:
    files = write_dial(tmp_path / "in", rows=1200)
    out = tmp_path / "out"
    assert search(files, out, "--max-accuracy-drop", 1, "--max-trials", 6).exit_code in (0, 6)
    found = trials(out)
    stopped = [t for t in found if t["state"] == "stopped early"]
    assert stopped and all("first 400 examples" in t["reason"] for t in stopped)
    assert all(t["accuracy"] < 0.95 for t in stopped)


def test_a_searched_technique_with_parameter_stages_is_one_step(
    tmp_path: Path, ft: FastTextFiles  # noqa: F811
) -> None:
    """The fastText space: dsub, qnorm and cutoff candidates make one pq step per trial."""
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["search", str(ft.model), "--data", str(ft.test), "--train-data",
                                      str(ft.train), "--max-accuracy-drop", "5", "--max-trials", "3",
                                      "--min-seconds", "0", "-o", str(out)])
    assert result.exit_code in (0, 6), result.output
    names = [t["name"] for t in trials(out)[1:]]
    assert names and all(name.count("pq") == 1 for name in names), names


def test_validated_stages_keep_their_technique() -> None:
    from compressor import search_space
    from compressor.plugins import get_host
    from compressor.searching import _valid_stages

    class Accepting:
        def progress(self, message: str, fraction: object) -> None:
            return None

        def validate(self, variants: list[Any]) -> list[Any]:
            return variants

    stages = _valid_stages(Accepting(), search_space.from_backend(get_host().backend("fasttext")))
    combination = search_space.variant(tuple(len(stage.options) - 1 for stage in stages), stages)
    assert combination is not None and len(combination.steps) == 1


def test_the_onnx_backends_declared_space_finds_a_smaller_model(digits, tmp_path: Path) -> None:
    """No --space: the stages come from the onnx backend's candidates (channel pruning,
    lowrank, quantize), and the int8 step needing calibration data is dropped with a note."""
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["search", str(digits.onnx), "--data", str(digits.eval),
                                      "--max-accuracy-drop", "1", "--max-trials", "4", "--min-seconds", "0",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    summary = report["settings"]["search"]
    assert summary["stages"]["quantize"] == ["none", "quantize fp16", "quantize dynamic", "quantize int4"]
    assert summary["space_size"] == 4 * 4 * 4  # prune channel x lowrank x quantize fp16/dynamic/int4, each or none
    winner = report["variants"][[t["name"] for t in trials(out)].index(summary["winner"])]
    assert winner["metrics"]["size_bytes"] < report["variants"][0]["metrics"]["size_bytes"] / 3
    assert (out / "best.onnx").is_file()
