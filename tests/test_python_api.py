"""compressor.run / measure / compare from Python, and the docs page's example, run for real."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import compressor
from compressor import InvalidInputError, UsageError
from compressor.api import parse_variants

ROOT = Path(__file__).resolve().parent.parent


def test_run_without_out_keeps_artifacts_in_a_folder_the_report_owns(toy_host, toy_model) -> None:
    report = compressor.run(toy_model["model"], ["quantize fp16", ["prune 0.5", "quantize dynamic"]],
                            data=toy_model["eval"], min_seconds=0)
    assert [v.name for v in report.variants] == ["original", "fp16", "prune0.5-dynamic"]
    folder = report.folder
    assert folder is not None and (folder / "report.json").is_file()
    assert all(v.artifact_path.is_file() for v in report.variants)
    best = report.best("size", min_agreement=0.9)
    assert best is not None and best.name in ("fp16", "prune0.5-dynamic")
    assert report.best("size", min_agreement=1.01) is None
    table = report.to_pandas()
    assert list(table.index) == ["original", "fp16", "prune0.5-dynamic"]
    assert table.loc["original", "accuracy"] == 1.0 and table.loc["fp16", "smaller"] > 1
    report.cleanup()
    assert not folder.exists()


def test_run_with_out_and_compare(toy_host, toy_model, tmp_path: Path) -> None:
    first = compressor.run(toy_model["model"], {"half": "quantize fp16"}, data=toy_model["eval"],
                           out=tmp_path / "a", min_seconds=0)
    second = compressor.measure(toy_model["model"], data=toy_model["eval"], out=tmp_path / "b", min_seconds=0)
    assert first.variant("half").artifact_path == tmp_path / "a" / "half.toy"
    assert [v.name for v in second.variants] == ["original"]
    merged = compressor.compare(first, tmp_path / "b")
    assert [v.name for v in merged.variants] == ["a:original", "a:half", "b:original"]


def test_errors_are_the_cli_errors_and_leave_nothing(toy_host, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no such file"):
        compressor.run(tmp_path / "missing.toy", "quantize fp16")
    model = tmp_path / "m.toy"
    model.write_text('{"weights": [[1.0, 0.0]], "bias": [0.0, 0.0]}')
    with pytest.raises(UsageError, match="is not one of"):
        compressor.run(model, "quantize fp16", settings={"task": "banana"}, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="a variant is a step string"):
        parse_variants([5])  # type: ignore[list-item]


@pytest.mark.parametrize("given, names", [
    ("quantize fp16", ["fp16"]),
    (["quantize fp16", "quantize dynamic"], ["fp16", "dynamic"]),
    ([["prune 0.5", "quantize dynamic"]], ["prune0.5-dynamic"]),
    ({"small": ["prune 0.8", "quantize fp16"]}, ["small"]),
])
def test_variants_come_in_several_forms(given: object, names: list[str]) -> None:
    assert [v.name for v in parse_variants(given)] == names  # type: ignore[arg-type]


def test_the_python_api_page_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/python-api.md's examples, run in order as one notebook session, their shown
    outputs checked (doctest), with ``tmp`` a str as the page says it may be."""
    import doctest

    text = (ROOT / "docs" / "python-api.md").read_text()
    blocks = re.findall(r"```pycon\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    test = doctest.DocTestParser().get_doctest("\n".join(blocks), {"tmp": str(tmp_path)}, "docs/python-api.md",
                                                str(ROOT / "docs" / "python-api.md"), 0)
    globs = test.globs
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failures: list[str] = []
    runner.run(test, out=failures.append, clear_globs=False)
    try:
        assert runner.failures == 0, "".join(failures)
        best = globs["best"]
        assert best is not None and best.artifact_path.is_file()  # type: ignore[attr-defined]
    finally:
        getattr(globs.get("report"), "cleanup", lambda: None)()
