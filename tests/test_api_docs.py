"""The Python API as a user finds it: ``dir()`` and ``help()`` list it, its docstrings name
only what can be imported, their examples run (doctest), reports print short and show
their table in a notebook, and every path may be a ``str``."""

from __future__ import annotations

import doctest
import io
import pydoc
import re
import shutil
from pathlib import Path

import pytest

import compressor
from compressor import api, run_progress

API = ("run", "search", "measure", "compare", "Report")


def test_dir_and_help_list_the_api() -> None:
    listed = dir(compressor)
    assert all(name in listed for name in API)
    text = pydoc.render_doc(compressor, renderer=pydoc.plaintext)
    for name in ("run(", "search(", "measure(", "compare(", "class Report"):
        assert name in text, name
    from compressor import Report, VariantResult, VariantsLike  # noqa: F401 - importable, as the docs name them

    assert compressor.Report is compressor.report.Report


def test_the_docstrings_name_only_importable_types() -> None:
    for name in ("run", "search", "measure", "compare"):
        doc = getattr(compressor, name).__doc__ or ""
        for word in set(re.findall(r"\b[A-Z][a-z]+(?:[A-Z][a-z0-9]*)+\b", doc)):  # CamelCase: a type
            assert hasattr(compressor, word), f"{name}.__doc__ names {word}, which compressor does not export"


def test_a_report_prints_one_line_and_shows_its_table_in_a_notebook(toy_host, toy_model, tmp_path: Path) -> None:
    report = compressor.run(str(toy_model["model"]), ["quantize fp16"], data=str(toy_model["eval"]),
                            out=str(tmp_path / "out"), min_seconds=0)
    text = repr(report)
    assert "\n" not in text and len(text) < 200
    assert text == f"<Report of model.toy on toy: original, fp16 in {tmp_path / 'out'}>"
    assert repr(report.variant("fp16")).startswith("<VariantResult 'fp16': quantize fp16; ")
    html = report._repr_html_()
    assert "<table>" in html and "<td>fp16</td>" in html
    # Every path a str: the report folder, compare, and the paths the report hands back.
    merged = compressor.compare(str(tmp_path / "out"))
    assert [v.name for v in merged.variants] == ["original", "fp16"]
    assert report.variant("fp16").artifact_path == tmp_path / "out" / "fp16.toy"


def test_search_takes_str_paths(dial_host, tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    from search_backend import write_dial

    files = write_dial(tmp_path / "in")
    found = compressor.search(str(files["model"]), data=str(files["data"]), max_accuracy_drop=5, max_trials=2,
                              out=str(tmp_path / "out"), min_seconds=0)
    assert found.folder == tmp_path / "out" and (tmp_path / "out" / "report.json").is_file()


def _run_examples(tests: list[doctest.DocTest], globs: dict[str, object]) -> str:
    """Every example, in order, sharing ``globs`` as one notebook session; the failures' report."""
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    output = io.StringIO()
    for test in tests:
        test.globs = globs
        runner.run(test, out=output.write, clear_globs=False)
    return output.getvalue() if runner.failures else ""


@pytest.mark.slow
def test_the_api_modules_examples_run_as_one_session() -> None:
    """compressor.api's docstrings: the module's example first, then run, measure, compare, search."""
    order = ["compressor.api", "compressor.api.run", "compressor.api.measure", "compressor.api.compare",
             "compressor.api.search"]
    found = {test.name: test for test in doctest.DocTestFinder().find(api, "compressor.api") if test.examples}
    assert sorted(found) == sorted(order)  # every example runs
    globs: dict[str, object] = {}
    try:
        assert _run_examples([found[name] for name in order], globs) == ""
    finally:
        for name in ("report", "pruned", "measured", "found"):
            getattr(globs.get(name), "cleanup", lambda: None)()
        if isinstance(globs.get("folder"), str):
            shutil.rmtree(str(globs["folder"]), ignore_errors=True)


def test_the_progress_example_runs() -> None:
    failures, attempted = doctest.testmod(run_progress, optionflags=doctest.ELLIPSIS)
    assert attempted > 0 and failures == 0
