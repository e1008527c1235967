"""The public plugin API (compressor.plugin) and the conformance helper (compressor.testing)."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import compressor.plugin as api
from compressor.testing import ConformanceError, check_backend, registered

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = ("torch", "tensorflow", "tf_keras", "keras", "onnx", "onnxruntime", "openvino", "nncf",
              "fasttext", "transformers", "numpy")


def test_importing_the_public_api_imports_no_framework() -> None:
    probe = ("import sys, compressor.plugin, compressor.testing\n"
             f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"


def test_every_public_name_resolves_and_is_documented() -> None:
    assert len(api.__all__) == len(set(api.__all__)) >= 30
    reference = [match.group(1) for line in (api.__doc__ or "").split("\nHooks\n", 1)[1].splitlines()
                 if (match := re.match(r"    ([A-Za-z_]\w*)(\s|$)", line))]
    for name in api.__all__:
        value = getattr(api, name)
        assert name in reference, f"{name} is not in compressor.plugin's reference"
        if inspect.isclass(value) or inspect.isfunction(value):
            assert (value.__doc__ or "").strip(), f"{name} has no docstring"
    assert sorted(reference) == sorted(api.__all__), "the reference names something __all__ does not"


def test_public_names_are_core_s_own_objects() -> None:
    """A plugin importing from compressor.plugin and one importing from compressor get one type."""
    import compressor
    from compressor import errors, hookspecs, models

    shared = [name for name in api.__all__ if name in compressor.__all__]
    assert len(shared) >= 20
    for name in shared:
        assert getattr(api, name) is getattr(compressor, name), name
    assert api.hookimpl is hookspecs.hookimpl and api.first_line is errors.first_line
    assert api.ProgressCallback is models.ProgressCallback


def test_the_helpers_behave_as_documented(tmp_path: Path) -> None:
    import numpy as np

    assert api.first_line(RuntimeError("first\nsecond")) == "first"
    info = api.cpu_info()
    assert set(info) == {"model", "cores", "flags"} and info["cores"] >= 1
    assert api.peak_rss_bytes() > 1_000_000
    factory = api.import_factory("json:loads", "model_factory")
    assert factory("[1]") == [1]
    with pytest.raises(api.UsageError, match="model_factory 'json:nothing'"):
        api.import_factory("json:nothing", "model_factory")
    dataset = api.Dataset(tmp_path / "d.npz", {"x": np.arange(12, dtype=np.float64).reshape(6, 2)}, None, 6)
    examples = api.examples_from_data(dataset, (api.TensorSpec("x", (None, 2), "float32"),), {}, limit=4)
    assert examples.count == 4
    batch = examples.take(1, 3)
    assert batch["x"].dtype == np.float32 and batch["x"].tolist() == [[2, 3], [4, 5]]


@pytest.fixture
def example_plugin(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """examples/compressor-example's plugin module, importable here and in measuring processes
    (copied without the metadata a build leaves next to it: it is no entry point)."""
    import importlib
    import shutil

    folder = tmp_path_factory.mktemp("example")
    shutil.copytree(ROOT / "examples" / "compressor-example" / "compressor_example", folder / "compressor_example")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "compressor_example", raising=False)
    monkeypatch.delitem(sys.modules, "compressor_example.plugin", raising=False)
    yield importlib.import_module("compressor_example.plugin")


def test_the_example_plugin_passes_the_conformance_check(example_plugin: ModuleType, tmp_path: Path) -> None:
    with registered(example_plugin, "npz-mlp"):
        (report,) = check_backend("npz-mlp", tmp_path)
    assert [variant.name for variant in report.variants] == ["original", "fp16", "dynamic", "prune0.5"]
    assert report.variant("fp16").metrics["agreement"] == 1.0
    assert report.variant("dynamic").metrics["agreement"] > 0.95
    sizes = [variant.metrics["size_bytes"] for variant in report.variants]
    assert 1.8 < sizes[0] / sizes[1] <= 2.0 and sizes[0] / sizes[2] > 3


def _returns_its_input(model: api.Model, step: api.Step, context: api.Context) -> api.Model:
    return model


def _changes_shared_weights(model: api.Model, step: api.Step, context: api.Context) -> api.Model:
    model.handle["W0"] *= 0.5  # in place: the loaded model's array too
    return api.Model(model.backend, model.source, model.format, dict(model.handle), model.inputs)


@pytest.mark.parametrize(("compress", "message"), [
    (_returns_its_input, "compressor_compress 'quantize fp16' must return a new Model"),
    (_changes_shared_weights, "output 'logits' of the loaded model changed"),
])
def test_the_conformance_check_names_a_broken_contract(example_plugin: ModuleType, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, compress: object,
                                                       message: str) -> None:
    monkeypatch.setattr(example_plugin, "compressor_compress", api.hookimpl(compress))
    with registered(example_plugin, "npz-mlp"), pytest.raises(ConformanceError, match=re.escape(message)):
        check_backend("npz-mlp", tmp_path)
    assert not (tmp_path / "run-mlp").exists()


def test_an_unknown_backend_is_a_conformance_error(tmp_path: Path) -> None:
    with pytest.raises(ConformanceError, match="no backend 'nothing' is registered"):
        check_backend("nothing", tmp_path)


def test_built_in_plugins_and_front_ends_use_only_the_public_api() -> None:
    """Backends and front ends are written as a third party's would be: compressor.plugin
    (and compressor.testing) only, so that core's private modules can change."""
    import ast

    private = []
    for path in sorted([*(ROOT / "backends").rglob("*.py"), *(ROOT / "frontends").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0
                     else [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            private += [f"{path.relative_to(ROOT)}:{node.lineno} {name}" for name in names
                        if name == "compressor" or (name.startswith("compressor.")
                                                    and name not in ("compressor.plugin", "compressor.testing"))]
    assert not private, private
