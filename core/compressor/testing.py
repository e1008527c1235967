"""Testing a backend plugin against the plugin contract, on the real plugin host.

    from compressor.testing import check_backend, registered
    import compressor_mybackend.plugin as plugin

    def test_my_backend_conforms(tmp_path):
        with registered(plugin, "mybackend"):
            (report,) = check_backend("mybackend", tmp_path)
        assert report.variant("fp16").metrics["agreement"] > 0.99

:func:`check_backend` takes each sample model the backend makes
(``compressor_sample_models``) through the hooks one by one, checking what each
returns, and then through a whole ``compressor.run`` (load, compress, save, and
measurement in a separate process) as a user would; it returns the reports for
the test's own assertions on the numbers. A broken contract raises
:class:`ConformanceError` (an ``AssertionError``) that says which hook did what.
Importing this module imports no ML framework.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compressor.children import child_environment
from compressor.models import Artifact, Context, MeasureSettings, Model, SampleModel, TensorSpec
from compressor.plugins import PluginHost, get_host, plugin_errors
from compressor.runtime import Runtime
from compressor.specs import Backend

if TYPE_CHECKING:
    from compressor.report import Report

__all__ = ["ConformanceError", "check_backend", "registered"]


class ConformanceError(AssertionError):
    """A backend broke the plugin contract; the message names the hook and what it did."""


@contextmanager
def registered(plugin: object, name: str) -> Iterator[None]:
    """Register ``plugin`` (a module, as its entry point names it) on the process-wide host
    under ``name`` for the block, as installing the package would.

    When a plugin of that name is already loaded (the package is installed, so its entry
    point registered it) that one stays and is used. A module plugin also reaches the
    measuring processes."""
    host = get_host()
    if host.manager.get_plugin(name) is not None:
        yield
        return
    host.register(plugin, name=name)
    try:
        yield
    finally:
        host.unregister(name)


def check_backend(backend: str, folder: Path, *, min_seconds: float = 0.0,
                  max_examples: int | None = 200, precision: float = 0.0,
                  max_seconds: float = 60.0) -> list[Report]:
    """Check ``backend`` on its sample models and return one report per sample.

    For each sample: declaring and identifying import none of the backend's frameworks
    (in a fresh process); load returns a :class:`Model` of this backend with its inputs;
    every variant is forked, compressed step by step (each step a new Model), saved (an
    Artifact whose files exist in the staging folder) and opened as a :class:`Runtime`
    that runs a synthetic example to every output it declares; the loaded model gives
    the same outputs after all that as before (compress changed no shared state). Then
    ``compressor.run`` makes and measures the sample's variants: none may fail, each
    has its size and latency, and with evaluation data its fidelity. ``folder`` (new or
    empty, such as pytest's ``tmp_path``) receives the samples, artifacts and reports.
    ``precision`` and ``max_seconds`` are :func:`compressor.run`'s: 0, the default, times
    each variant for ``min_seconds`` only (a conformance check, not a speed study); give
    0.03 to also time variants against the original side by side."""
    host = get_host()
    declared = _declared(host, backend)
    reports = []
    for sample in _samples(host, declared, folder / "samples"):
        _check_cheap_hooks(host, declared, sample.path)
        _check_hooks(host, declared, sample, folder / f"hooks-{sample.name}")
        reports.append(_check_run(declared, sample, folder / f"run-{sample.name}", min_seconds=min_seconds,
                                  max_examples=max_examples, precision=precision, max_seconds=max_seconds))
    return reports


def _expect(condition: object, backend: Backend, message: str) -> None:
    if not condition:
        raise ConformanceError(f"backend {backend.name!r} (plugin {backend.plugin_name!r}): {message}")


def _declared(host: PluginHost, name: str) -> Backend:
    backends = host.backends()
    if name not in backends:
        raise ConformanceError(f"no backend {name!r} is registered (plugins: "
                               f"{', '.join(p.name for p in host.plugins())}); install the package "
                               "or use compressor.testing.registered")
    declared = backends[name]
    _expect(declared.is_installed(), declared, f"its modules are missing: {declared.missing_modules()}")
    for key, technique in declared.techniques.items():
        _expect(key == technique.name, declared, f"technique {technique.name!r} is declared under {key!r}")
    return declared


def _samples(host: PluginHost, declared: Backend, folder: Path) -> list[SampleModel]:
    folder.mkdir(parents=True, exist_ok=True)
    with plugin_errors(declared):
        produced = host.hook_for(declared.name, "compressor_sample_models")(directory=folder)
    samples = [sample for batch in produced for sample in batch or () if sample.backend == declared.name]
    _expect(samples, declared, "compressor_sample_models made no sample model of this backend")
    for sample in samples:
        _expect(sample.path.exists(), declared, f"sample {sample.name!r} has no file at {sample.path}")
        _expect(sample.variants, declared, f"sample {sample.name!r} names no variants")
    return samples


#: Run in a fresh process: import the plugin, declare, identify; print the frameworks imported.
_CHEAP_PROBE = """
import importlib, json, pathlib, sys
plugin = importlib.import_module(sys.argv[1])
list(plugin.compressor_backends())
identify = getattr(plugin, "compressor_identify", None)
claimed = identify(path=pathlib.Path(sys.argv[2])) if identify else None
frameworks = json.loads(sys.argv[3])
print(json.dumps({"imported": sorted(m for m in frameworks if m in sys.modules), "claimed": claimed}))
"""


def _check_cheap_hooks(host: PluginHost, declared: Backend, sample: Path) -> None:
    module = getattr(host.manager.get_plugin(declared.plugin_name), "__name__", None)
    if module is None:
        return  # an object registered in-process: a fresh process cannot import it
    frameworks = sorted({*declared.requires, *declared.runtime_imports})
    flags = ["-P"] if sys.version_info >= (3, 11) else []  # nothing from the working directory
    command = [sys.executable, *flags, "-c", _CHEAP_PROBE, module, str(sample), json.dumps(frameworks)]
    result = subprocess.run(command, capture_output=True, text=True, env=child_environment(), timeout=120)
    _expect(result.returncode == 0, declared, f"importing {module}, compressor_backends or compressor_identify "
                                              f"failed: {result.stderr.strip()[-500:]}")
    found = json.loads(result.stdout.strip().splitlines()[-1])
    _expect(not found["imported"], declared, f"compressor_backends/compressor_identify imported "
                                             f"{', '.join(found['imported'])}: import frameworks inside hooks")
    _expect(found["claimed"] in (None, declared.name), declared,
            f"compressor_identify named {found['claimed']!r} for its own sample")


def _check_hooks(host: PluginHost, declared: Backend, sample: SampleModel, folder: Path) -> None:
    from compressor.loading import fork_model, load_data, load_model
    from compressor.recipes import variants_from_strings
    from compressor.validation import apply_settings

    variants, options = apply_settings(declared, variants_from_strings(sample.variants), dict(sample.options))
    (folder / "work").mkdir(parents=True, exist_ok=True)
    context = Context(options=options, workdir=folder / "work")
    model = load_model(host, declared, sample.path, context)
    _expect(isinstance(model, Model) and model.backend == declared.name, declared,
            f"compressor_load returned {model!r:.120}, not a Model of this backend")
    _expect(all(isinstance(spec, TensorSpec) for spec in model.inputs), declared,
            "compressor_load: Model.inputs must be TensorSpecs")
    context.eval_data = load_data(host, declared, sample.eval_data, "eval", model)
    context.calibration_data = load_data(host, declared, sample.calibration_data, "calibration", model)
    context.train_data = load_data(host, declared, sample.train_data, "train", model)
    settings = MeasureSettings(options=options)
    before = _saved_outputs(host, declared, model, context, folder / "original-before", settings)
    for index, variant in enumerate(variants):
        current = fork_model(host, declared, model, sample.path, context)
        for step in variant.steps:
            with plugin_errors(declared):
                compressed = host.hook_for(declared.name, "compressor_compress")(
                    model=current, step=step, context=context)
            _expect(isinstance(compressed, Model) and compressed is not current, declared,
                    f"compressor_compress '{step}' must return a new Model, not {compressed!r:.120}")
            current = compressed
        outputs = _saved_outputs(host, declared, current, context, folder / f"variant-{index}", settings)
        _expect(set(outputs) == set(before), declared,
                f"variant {variant.name!r} has outputs {sorted(outputs)}, the original {sorted(before)}")
    after = _saved_outputs(host, declared, model, context, folder / "original-after", settings)
    for name, array in before.items():
        _expect(_same(array, after[name]), declared, f"output {name!r} of the loaded model changed while "
                "variants were made from it: compress or fork changed shared state")


def _saved_outputs(host: PluginHost, declared: Backend, model: Model, context: Context, folder: Path,
                   settings: MeasureSettings) -> dict[str, Any]:
    """Save ``model`` into ``folder``, open the artifact and run one synthetic example:
    ``{output name: array}``. Every backend is measured through its runtime."""
    from compressor.feeding import synthetic_examples

    folder.mkdir(parents=True)
    with plugin_errors(declared):
        artifact = host.hook_for(declared.name, "compressor_save")(
            model=model, destination=folder / "model", context=context)
    _expect(isinstance(artifact, Artifact) and artifact.backend == declared.name, declared,
            f"compressor_save returned {artifact!r:.120}, not an Artifact of this backend")
    for file in artifact.files:
        _expect(file.is_file() and file.resolve().parent == folder.resolve(), declared,
                f"compressor_save: artifact file {file} is not a file in the staging folder {folder}")
    with plugin_errors(declared):
        runtime = host.hook_for(declared.name, "compressor_open_runtime")(artifact=artifact, settings=settings)
    _expect(runtime is not None, declared, "compressor_open_runtime returned no runtime (or is not implemented): "
            "core measures every backend through one (compressor_measure is deprecated and no longer called)")
    _expect(isinstance(runtime, Runtime), declared, f"compressor_open_runtime returned {runtime!r:.120}")
    _expect(runtime.inputs and runtime.outputs and all(
        isinstance(spec, TensorSpec) for spec in (*runtime.inputs, *runtime.outputs)), declared,
        "Runtime.inputs and Runtime.outputs must be non-empty tuples of TensorSpecs")
    examples = synthetic_examples(runtime.inputs, settings.options)
    try:
        produced = runtime.run(examples.take(0, runtime.fixed_batch or 1, pad_to=runtime.fixed_batch))
    finally:
        runtime.close()
    names = [spec.name for spec in runtime.outputs]
    _expect(isinstance(produced, Mapping) and set(names) <= set(produced), declared,
            f"Runtime.run returned {sorted(produced) if isinstance(produced, Mapping) else type(produced)}, "
            f"not every declared output {names}")
    return {name: produced[name] for name in names}


def _same(before: Any, after: Any) -> bool:
    """Equal, floats to rounding (a changed model moves them by far more)."""
    import numpy as np

    before, after = np.asarray(before), np.asarray(after)
    if before.shape != after.shape or before.dtype != after.dtype:
        return False
    if before.dtype.kind in "fc":
        return bool(np.allclose(before, after, rtol=1e-5, atol=1e-7, equal_nan=True))
    return bool(np.array_equal(before, after))


def _check_run(declared: Backend, sample: SampleModel, out: Path, **measuring: Any) -> Report:
    from compressor.api import run

    report = run(sample.path, [list(steps) for steps in sample.variants], backend=declared.name,
                 data=sample.eval_data, calibration_data=sample.calibration_data,
                 train_data=sample.train_data, settings=dict(sample.options), out=out,
                 **measuring)
    _expect(len(report.variants) == len(sample.variants) + 1, declared,
            f"sample {sample.name!r}: {len(sample.variants)} variants asked, got "
            f"{[variant.name for variant in report.variants]}")
    for variant in report.variants:
        _expect(variant.error is None, declared, f"sample {sample.name!r}, variant {variant.name!r}: {variant.error}")
        metrics = variant.metrics
        _expect(metrics.get("size_bytes", 0) > 0 and "latency_ms" in metrics, declared,
                f"variant {variant.name!r} has no size or latency: {sorted(metrics)}")
        if sample.eval_data is not None:
            _expect(any(key in metrics for key in ("agreement", "cosine", "accuracy")), declared,
                    f"variant {variant.name!r} was not compared with the original: {sorted(metrics)}")
    return report
