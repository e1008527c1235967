"""Hook implementations of the ``fasttext`` backend: product quantization of fastText classifiers.

Every model file is checked against its own size (:mod:`compressor_fasttext.header`)
before fastText reads it, because fastText aborts the whole process on a
corrupt or truncated file instead of raising.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from compressor.plugin import (
    Artifact,
    Backend,
    CompressionError,
    Context,
    Dataset,
    MeasureSettings,
    Model,
    Param,
    Runtime,
    SampleModel,
    Step,
    TensorSpec,
    hookimpl,
)

NAME = "fasttext"
SUFFIXES = (".bin", ".ftz")
#: fastText's ``predict`` takes a 32-bit k; nobody reads precision past a few hundred.
MAX_K = 10_000


@hookimpl
def compressor_backends() -> Iterator[Backend]:
    from compressor_fasttext.quantize import PQ_TECHNIQUE

    yield Backend(
        name=NAME,
        description="fastText text classifiers (.bin, .ftz): product quantization",
        formats=SUFFIXES,
        techniques={"pq": PQ_TECHNIQUE},
        options={
            "k": Param(int, 1, "report precision@k and recall@k at this k", minimum=1,
                       maximum=MAX_K),
            "probe_load": Param(
                bool, True,
                "load each input model in a child process first, so a fastText crash is an error",
            ),
        },
        extra="fasttext",
        requires=("fasttext",),
        # fasttext-predict installs a different module under the same name (predict only).
        providers={"fasttext": ("fasttext-numpy2", "fasttext", "fasttext-wheel")},
        # full_check fails to import where ``fasttext`` is predict-only (backends --check says so).
        runtime_imports=("fasttext", "compressor_fasttext.full_check"),
        distributions=("fasttext-numpy2",),
        default_variants=(("pq",),),
    )


#: Suffixes other formats own: a fastText model named like one is left to that format's
#: backend, which says the suffix lies, rather than claimed twice (core refuses that).
OTHER_FORMATS = (".onnx", ".pt", ".pth", ".pt2", ".safetensors", ".keras", ".h5", ".hdf5", ".tflite")


@hookimpl
def compressor_identify(path: Path) -> str | None:
    from compressor_fasttext.header import has_magic

    if path.suffix in SUFFIXES:
        return NAME
    if path.suffix.lower() not in OTHER_FORMATS and path.is_file() and has_magic(path):
        return NAME
    return None


@hookimpl
def compressor_load(path: Path, backend: str, context: Context) -> Model:
    from compressor_fasttext.loading import load_checked

    handle = load_checked(path, probe=bool(context.options.get("probe_load", True)))
    return Model(NAME, path, handle.suffix.lstrip("."), handle, metadata=handle.layout.describe())


@hookimpl
def compressor_load_data(
    path: Path, purpose: str, inputs: tuple[TensorSpec, ...], backend: str, limit: int | None
) -> Dataset | None:
    if path.suffix == ".npz":
        return None
    from compressor_fasttext.data import read_labelled_text

    return read_labelled_text(path, limit)


@hookimpl
def compressor_compress(model: Model, step: Step, context: Context) -> Model | None:
    if step.technique != "pq":
        return None
    from compressor_fasttext.quantize import product_quantize

    return product_quantize(model, step, context)


@hookimpl
def compressor_save(model: Model, destination: Path, context: Context) -> Artifact:
    path = destination.with_suffix(model.handle.suffix)
    try:
        model.handle.model.save_model(str(path))
    except ValueError as error:
        raise CompressionError(f"fastText could not save the model: {error}", path) from None
    return Artifact(NAME, path, path.suffix.lstrip("."))


@hookimpl
def compressor_open_runtime(artifact: Artifact, settings: MeasureSettings) -> Runtime:
    from compressor_fasttext.runtime import FastTextRuntime

    return FastTextRuntime(artifact, settings)


@hookimpl
def compressor_sample_models(directory: Path) -> list[SampleModel]:
    from compressor_fasttext.samples import sample_models

    return sample_models(directory)
