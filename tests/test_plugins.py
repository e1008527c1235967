"""Plugin discovery through real entry points, conflicts, broken plugins, import hygiene."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from compressor.plugins import PluginConflictError, PluginHost

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "tensorflow", "onnxruntime", "onnx", "fasttext", "tf_keras", "keras")


def run_cli(*args: object, extra_path: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **env}
    if extra_path is not None:
        environment["PYTHONPATH"] = os.pathsep.join([str(extra_path), environment.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "compressor", *map(str, args)],
                          capture_output=True, text=True, env=environment, timeout=300)


def write_dist(site: Path, name: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """A minimal installed distribution: a dist-info with entry points, plus modules."""
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "\n".join(f"{key} = {value}" for key, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[compressor]\n{lines}\n")
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))


def test_importing_compressor_and_help_load_no_framework() -> None:
    probe = (
        "import sys\n"
        "from compressor.cli import cli\n"
        "for args in (['--help'], ['backends'], ['plugins']):\n"
        "    try:\n"
        "        cli(args, prog_name='compressor')\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout[-500:]
    assert "onnx:" in result.stdout and "tflite:" in result.stdout and "fasttext:" in result.stdout


#: Each backend's plugin module with a file name it identifies, and the frameworks it must not import then.
PLUGIN_IMPORTS = {
    "compressor_onnx": ("m.onnx", ("torch", "onnx", "onnxruntime", "transformers", "tensorflow")),
    "compressor_tflite": ("m.keras", ("tensorflow", "tf_keras", "keras", "tensorflow_model_optimization",
                                      "ai_edge_litert", "torch", "h5py")),
    "compressor_fasttext": ("x.bin", ("fasttext",)),
    "compressor_torch": ("m.torch.json", ("torch", "torchao", "transformers", "safetensors")),
}


@pytest.mark.parametrize("package", sorted(PLUGIN_IMPORTS))
def test_declaring_and_identifying_imports_no_framework(package: str) -> None:
    filename, frameworks = PLUGIN_IMPORTS[package]
    code = (
        f"import sys, pathlib, {package}.plugin as p; list(p.compressor_backends()); "
        f"p.compressor_identify(pathlib.Path({filename!r})); "
        f"print([m for m in {frameworks!r} if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_plugin_that_raises_on_import_is_a_warning(tmp_path: Path) -> None:
    write_dist(tmp_path, "broken_plugin", {"broken": "broken_plugin_module"},
               {"broken_plugin_module": "raise RuntimeError('boom at import')\n"})
    result = run_cli("backends", extra_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        "warning: plugin 'broken' failed to load (RuntimeError: boom at import); skipped"]
    assert "onnx:" in result.stdout


def test_two_plugins_claiming_one_backend_name_both_get_named(tmp_path: Path) -> None:
    source = """
        from compressor import Backend, hookimpl
        @hookimpl
        def compressor_backends():
            return [Backend(name="onnx", description="impostor", formats=(".x",), techniques={})]
    """
    write_dist(tmp_path, "impostor", {"impostor": "impostor_module"}, {"impostor_module": source})
    result = run_cli("backends", extra_path=tmp_path)
    assert result.returncode == 5
    assert "backend 'onnx' is registered by two plugins" in result.stderr
    assert "'impostor'" in result.stderr and "'onnx'" in result.stderr


def test_load_plugins_variable_restricts_discovery() -> None:
    assert run_cli("backends", COMPRESSOR_LOAD_PLUGINS="").stdout == ""
    only = run_cli("backends", "--json", COMPRESSOR_LOAD_PLUGINS="fasttext")
    assert [b["name"] for b in json.loads(only.stdout)] == ["fasttext"]


def test_hook_for_calls_only_the_owning_plugin(toy_host) -> None:
    class Other:
        from compressor import Backend, hookimpl

        @hookimpl
        def compressor_backends(self):
            return [self.Backend(name="other", description="", formats=(), techniques={})]

        @hookimpl
        def compressor_save(self, model, destination, context):
            raise AssertionError("must not be called for toy models")

    toy_host.register(Other(), name="other")
    try:
        callers = toy_host.hook_for("toy", "compressor_save").get_hookimpls()
        assert "other" not in {impl.plugin_name for impl in callers}
        assert "toy" in {impl.plugin_name for impl in callers}
    finally:
        toy_host.unregister("other")


def test_conflicts_are_detected_in_process() -> None:
    from compressor import Backend, hookimpl

    class Twin:
        def __init__(self, name: str) -> None:
            self.name = name

        @hookimpl
        def compressor_backends(self):
            return [Backend(name="twin", description=self.name, formats=(), techniques={})]

    host = PluginHost(load_entry_points=False)
    host.register(Twin("a"), name="a")
    host.register(Twin("b"), name="b")
    with pytest.raises(PluginConflictError, match="'a' and 'b'|'b' and 'a'"):
        host.backends()


@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/compressor-example pip-installed into its own folder (not the test env)."""
    site = tmp_path_factory.mktemp("example-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(ROOT / "examples" / "compressor-example")],
        check=True, capture_output=True, timeout=300,
    )
    assert (site / "compressor_example" / "plugin.py").exists()
    return site


def test_the_example_plugin_is_listed_through_its_entry_point(example_site: Path) -> None:
    listed = run_cli("backends", "--json", extra_path=example_site)
    assert listed.returncode == 0, listed.stderr
    example = next(b for b in json.loads(listed.stdout) if b["name"] == "npz-mlp")
    assert example["installed"] and example["plugin"] == "npz-mlp"
    plugins = json.loads(run_cli("plugins", "--json", extra_path=example_site).stdout)
    info = next(p for p in plugins if p["name"] == "npz-mlp")
    assert (info["distribution"], info["version"]) == ("compressor-example", "0.1.0")


def test_the_example_plugin_compresses_and_measures(example_site: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = {"W0": rng.normal(size=(64, 256)).astype(np.float32), "b0": np.zeros(256, np.float32),
               "W1": rng.normal(size=(256, 5)).astype(np.float32), "b1": np.zeros(5, np.float32)}
    np.savez(tmp_path / "mlp.npz", **weights)
    x = rng.normal(size=(300, 64)).astype(np.float32)
    y = (np.maximum(x @ weights["W0"], 0) @ weights["W1"]).argmax(1)
    np.savez(tmp_path / "test.npz", x=x, y=y)
    out = tmp_path / "out"
    result = run_cli("run", tmp_path / "mlp.npz", "-q", "fp16", "-q", "dynamic", "--data",
                     tmp_path / "test.npz", "--out", out, extra_path=example_site)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["backend"] == "npz-mlp"
    original, fp16, dynamic = (v["metrics"] for v in report["variants"])
    assert original["accuracy"] == 1.0
    assert 1.8 < original["size_bytes"] / fp16["size_bytes"] <= 2.0
    assert original["size_bytes"] / dynamic["size_bytes"] > 3
    assert dynamic["agreement"] > 0.95


def test_a_misspelt_hook_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    source = """
        from compressor import hookimpl
        @hookimpl
        def compressor_mesure(artifact, data, settings):
            return None
    """
    write_dist(tmp_path, "typo_plugin", {"typo": "typo_module"}, {"typo_module": source})
    result = run_cli("backends", extra_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ("warning: plugin 'typo' implements compressor_mesure, which is not a compressor hook "
            "(did you mean compressor_measure?); skipped") in result.stderr


def test_a_misspelt_hook_registered_in_process_raises() -> None:
    import pluggy

    from compressor import hookimpl

    class Typo:
        @hookimpl
        def compressor_compres(self, model, step, context):
            return None

    with pytest.raises(pluggy.PluginValidationError, match="did you mean compressor_compress"):
        PluginHost(load_entry_points=False).register(Typo(), name="typo")


def test_every_hook_is_documented_in_the_plugin_guide() -> None:
    from compressor import hookspecs

    guide = (ROOT / "docs" / "writing-a-plugin.md").read_text()
    hooks = [name for name in dir(hookspecs) if name.startswith("compressor_")]
    assert len(hooks) >= 10
    missing = [name for name in hooks if f"`{name}(" not in guide]
    assert not missing, f"hooks missing from docs/writing-a-plugin.md: {missing}"
    for name in hooks:
        assert "Example::" in (getattr(hookspecs, name).__doc__ or ""), f"{name} has no example"


def test_the_plugin_guide_shows_the_example_plugin_as_it_is() -> None:
    """Code in docs/writing-a-plugin.md that uses the example's own names is copied from it."""
    guide = (ROOT / "docs" / "writing-a-plugin.md").read_text()
    example = (ROOT / "examples" / "compressor-example" / "compressor_example" / "plugin.py").read_text()
    import re

    blocks = [b for b in re.findall(r"```python\n(.*?)```", guide, re.S) if "NAME" in b or "Mlp" in b]
    assert len(blocks) >= 2
    for block in blocks:
        assert block.strip() in example, block[:80]


def test_a_heavy_plugin_does_not_change_another_backends_peak_ram(tmp_path: Path) -> None:
    """The measuring process imports only the measured backend's plugin."""
    from onnx_fixtures import tiny_onnx_with_external_data

    heavy = """
        from compressor import Backend, hookimpl
        BALLAST = bytearray(200 * 1024 * 1024)
        BALLAST[::4096] = b"x" * len(BALLAST[::4096])
        @hookimpl
        def compressor_backends():
            return [Backend(name="heavy", description="allocates at import", formats=(".heavy",),
                            techniques={})]
    """
    site = tmp_path / "site"
    write_dist(site, "heavy_plugin", {"heavy": "heavy_module"}, {"heavy_module": heavy})
    model = tiny_onnx_with_external_data(tmp_path / "model")
    peaks = []
    for extra in (None, site):
        out = tmp_path / f"out-{'heavy' if extra else 'plain'}"
        result = run_cli("measure", model, "--min-seconds", "0", "--out", out, extra_path=extra)
        assert result.returncode == 0, result.stderr
        report = json.loads((out / "report.json").read_text())
        peaks.append(report["variants"][0]["metrics"]["peak_rss_bytes"])
    assert abs(peaks[1] - peaks[0]) < 30 * 1024 * 1024, peaks
