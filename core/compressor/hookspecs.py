"""The hooks a compressor plugin implements.

A plugin is a module (or object) with functions decorated by
``compressor.hookimpl`` and named like the specs below. It is found through the
``compressor`` entry-point group::

    [project.entry-points.compressor]
    mybackend = "compressor_mybackend.plugin"

Per-backend hooks (load, load_data, compress, save, open_runtime) are called only on the
plugin that registered the model's backend plus plugins that register no
backend at all (generic measurers), so an implementation does not have to
check backend names unless it registers several backends.

Hooks may only gain arguments over time (pluggy passes just the ones an
implementation names); none is removed without a deprecation period.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import pluggy

from compressor.models import (
    Artifact,
    Context,
    Dataset,
    Measurement,
    MeasureSettings,
    Model,
    SampleModel,
    Step,
    TensorSpec,
)
from compressor.runtime import Runtime
from compressor.specs import Backend

PROJECT_NAME = "compressor"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def compressor_backends() -> Iterable[Backend]:
    """Declare the backends this plugin provides.

    Called once at start-up. It must be cheap: do not import frameworks here.

    Example::

        @hookimpl
        def compressor_backends():
            yield Backend(
                name="npz",
                description="NumPy weight archives",
                formats=(".npz",),
                techniques={"quantize": Technique("quantize", modes=("fp16", "int8"))},
                requires=("numpy",),
            )
    """


@hookspec(firstresult=True)
def compressor_identify(path: Path) -> str | None:
    """Name the backend that reads ``path``, or None if it is not one of yours.

    Asked of every plugin when the user gives no ``--backend``. Look at the
    suffix or a few magic bytes only: no framework imports, no full parse.

    Example::

        @hookimpl
        def compressor_identify(path):
            return "npz" if path.suffix == ".npz" else None
    """


@hookspec(firstresult=True)
def compressor_load(path: Path, backend: str, context: Context) -> Model | None:
    """Load ``path`` as a model of ``backend`` (one of the names you registered).

    Raise ``InvalidInputError`` for a corrupt or mismatched file and
    ``UnsafeInputError`` for one that would execute code without
    ``context.trust``; return None only if you cannot read this kind of file.
    ``context.options`` holds the validated ``--set`` backend options.

    Example::

        @hookimpl
        def compressor_load(path, backend, context):
            try:
                weights = dict(numpy.load(path, allow_pickle=False))
            except (OSError, ValueError) as error:
                raise InvalidInputError(f"not a weight archive ({error})", path)
            return Model(backend="npz", source=path, format="npz", handle=weights)
    """


@hookspec(firstresult=True)
def compressor_fork(model: Model, context: Context) -> Model | None:
    """Return an independent starting point for one variant, made from ``model``.

    Core loads the model once per run and calls this before each variant's
    steps, so a backend can share what loading and converting cost (a torch
    export, a big file read) across variants. The returned model's handle must
    not change when a later step changes the fork. Return None (or do not
    implement it) and core loads the model from disk again for each variant.

    Example::

        @hookimpl
        def compressor_fork(model, context):
            # Steps return new weights and never modify the old ones: share them.
            return dataclasses.replace(model, notes=list(model.notes),
                                       metadata=dict(model.metadata))
    """


@hookspec(firstresult=True)
def compressor_load_data(
    path: Path, purpose: str, inputs: tuple[TensorSpec, ...], backend: str, limit: int | None,
    model_path: Path | None, context: Context | None,
) -> Dataset | None:
    """Read a data file for a model of ``backend`` whose inputs are ``inputs``.

    ``purpose`` is ``"eval"``, ``"train"`` or ``"calibration"``. ``limit`` is
    the most examples anyone will use (``--max-examples``), or None for all:
    read no more than that, so a large file costs neither time nor memory
    (the measuring process's peak RAM is reported). Core reads ``.npz`` files
    itself (one array per input, named like it or ``x``; labels in ``y``);
    implement this for other formats, e.g. fastText's labelled text. Raise
    ``InvalidInputError`` when the file does not fit the model.

    ``model_path`` is the model the data is for (a folder with a tokenizer,
    say) and ``context`` the run's (``options``, ``workdir``); both are None in
    the measuring process, which reads the data again there. A format that
    needs the model or heavy imports to read (text to tokenize) is turned into
    arrays once, here: write them as an ``.npz`` into ``context.workdir`` and
    name it in ``Dataset.prepared``; core measures from that file. Like every
    argument, name these only if you use them (pluggy passes what you name).

    Example::

        @hookimpl
        def compressor_load_data(path, purpose, inputs, backend, limit):
            if path.suffix != ".txt":
                return None
            with path.open() as stream:
                lines = [line.rstrip("\\n") for line in itertools.islice(stream, limit)]
            return Dataset(path=path, features=lines, labels=None, size=len(lines))
    """


@hookspec
def compressor_check_steps(model: Model, steps: Sequence[Step], context: Context) -> None:
    """Refuse, before any work, steps this loaded model cannot take on this backend.

    Called for every variant of a run (every backend of ``--backend a,b``) once the
    models and data are loaded and before anything is exported, converted or
    compressed: raise :class:`~compressor.errors.UsageError` or
    :class:`~compressor.errors.UnsupportedError` naming the step and what to pass
    instead. ``steps`` are validated against the declaration already; check here only
    what the declaration cannot say (the model's format, the order of the steps). It
    must be cheap: no export, conversion or training.

    Example::

        @hookimpl
        def compressor_check_steps(model, steps, context):
            if model.format == "torch" and any(step.technique == "prune" for step in steps):
                raise UsageError("prune needs a Keras model here; use --backend onnx")
    """


@hookspec(firstresult=True)
def compressor_compress(model: Model, step: Step, context: Context) -> Model | None:
    """Apply one step (already validated against the backend's declaration).

    Return a new :class:`Model`; the input model may be discarded afterwards.
    Steps run in order, so ``prune 0.8`` then ``quantize int8`` sees the
    pruned model.

    Example::

        @hookimpl
        def compressor_compress(model, step, context):
            if step.technique == "quantize" and step.mode == "fp16":
                weights = {k: v.astype("float16") for k, v in model.handle.items()}
                return Model(model.backend, model.source, "npz", weights)
            return None
    """


@hookspec(firstresult=True)
def compressor_save(model: Model, destination: Path, context: Context) -> Artifact | None:
    """Write ``model`` in its deployable format.

    ``destination`` is a path without a suffix inside a private staging folder;
    add your suffix (``destination.with_suffix(".onnx")``) and any side files
    next to it. Core moves the files into ``--out`` atomically afterwards.

    Example::

        @hookimpl
        def compressor_save(model, destination, context):
            path = destination.with_suffix(".npz")
            numpy.savez(path, **model.handle)
            return Artifact(backend="npz", path=path, format="npz")
    """


@hookspec(firstresult=True)
def compressor_open_runtime(artifact: Artifact, settings: MeasureSettings) -> Runtime | None:
    """Open a saved artifact for running, in the measuring process.

    Core times this call as ``load_ms`` (after importing the modules in
    ``Backend.runtime_imports``), then measures the returned
    :class:`~compressor.runtime.Runtime` itself: data to inputs, batching,
    latency, peak RSS, every output's meaning and its comparison with the
    original. Use ``settings.threads`` for the runtime's thread count. Every
    backend is measured this way (``compressor_measure`` is deprecated).

    Example::

        @hookimpl
        def compressor_open_runtime(artifact, settings):
            return NpzRuntime(artifact.path)
    """


#: Why ``compressor_measure`` is deprecated, and what to do instead (warned when a plugin implements it).
MEASURE_DEPRECATION = (
    "compressor_measure is deprecated and no longer called: core measures every backend through "
    "the Runtime its plugin opens (implement compressor_open_runtime; see docs/writing-a-plugin.md)"
)


@hookspec(warn_on_impl=DeprecationWarning(MEASURE_DEPRECATION))
def compressor_measure(
    artifact: Artifact, data: Dataset | None, settings: MeasureSettings
) -> Measurement | None:
    """Deprecated, and no longer called: implement :func:`compressor_open_runtime`.

    This was the older way to measure a saved artifact: the backend timed it and
    returned ``predictions``/``outputs`` for core to compare. Core now measures every
    backend the same way through the :class:`~compressor.runtime.Runtime` its plugin
    opens (latency, memory, every output's task and comparison), and a runtime's own
    figures on the data come from :meth:`~compressor.runtime.Runtime.evaluate`. The
    hook stays declared so that a plugin implementing it still loads (with a warning);
    it will be removed in a later release. What to implement instead, with the
    ``predict`` of the old example as a runtime's ``run``:

    Example::

        class NpzRuntime(Runtime):
            inputs = (TensorSpec("x", (None, 64), "float32"),)
            outputs = (TensorSpec("label", (None,), "int64"),)

            def __init__(self, path):
                self.weights = dict(numpy.load(path))

            def run(self, feeds):
                return {"label": (feeds["x"] @ self.weights["w"]).argmax(1)}

        @hookimpl
        def compressor_open_runtime(artifact, settings):
            return NpzRuntime(artifact.path)
    """


@hookspec
def compressor_sample_models(directory: Path) -> Iterable[SampleModel]:
    """Write a small sample model (and its data) into ``directory`` for ``compressor demo``.

    Only called for backends whose dependencies are installed. Keep it to a few
    seconds.

    Example::

        @hookimpl
        def compressor_sample_models(directory):
            path = directory / "tiny.npz"
            numpy.savez(path, w=numpy.random.rand(64, 10).astype("float32"))
            yield SampleModel(backend="npz", name="tiny", path=path,
                              variants=(("quantize fp16",), ("quantize int8",)))
    """
