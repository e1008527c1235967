"""Hook implementations of the ``onnx`` backend: PyTorch and ONNX models to
(quantized) ONNX, measured through ONNX Runtime.

Importing this module imports no framework; every hook imports what it needs.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path

from compressor import (
    Artifact,
    Backend,
    CompressionError,
    Context,
    Dataset,
    Measurement,
    MeasureSettings,
    Model,
    Param,
    SampleModel,
    Step,
    Technique,
    hookimpl,
)
from compressor_onnx.loading import Network, is_transformers_folder

NAME = "onnx"
IDENTIFIED_SUFFIXES = (".onnx", ".pt2", ".pt", ".pth", ".safetensors")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def backend() -> Backend:
    quantize_params = {
        "per_channel": Param(bool, True, "one scale per output channel (measured: better accuracy)"),
        "calibration_method": Param(str, "minmax", "static calibration", choices=CALIBRATION_METHODS),
        "calibration_samples": Param(int, 128, "calibration examples used", minimum=1),
        "exclude_nodes": Param(str, "", "comma-separated node names kept float"),
        "exclude_op_types": Param(str, "", "comma-separated op types kept float, e.g. Gather"),
    }
    return Backend(
        name=NAME,
        description="PyTorch and ONNX models to (quantized) ONNX, run by ONNX Runtime",
        formats=(*IDENTIFIED_SUFFIXES, ".bin", "transformers folder"),
        techniques={
            "quantize": Technique(
                "quantize",
                help="ONNX Runtime quantization: dynamic int8, static QDQ int8/uint8, fp16",
                modes=("fp16", "dynamic", "int8", "uint8"),
                params=quantize_params,
                requires_data={"int8": "calibration", "uint8": "calibration"},
            ),
            "prune": Technique(
                "prune",
                help="per-layer magnitude pruning, made permanent (real zeros)",
                params={
                    "sparsity": Param(
                        float, None, "share of weights set to zero", minimum=0, maximum=0.99,
                        required=True,
                    ),
                },
            ),
        },
        options={
            "model_factory": Param(str, None, "package.module:function building the nn.Module for a state_dict"),
            "input_shape": Param(str, None, "example input shapes, e.g. 1,64 or input_ids:1,128:int64;attention_mask:1,128:int64"),
            "opset": Param(int, 17, "ONNX opset of exported graphs", minimum=13, maximum=21),
        },
        extra="onnx",
        requires=("onnxruntime", "onnx", "torch"),
        distributions=("torch", "onnx", "onnxruntime", "transformers"),
        default_variants=(("quantize dynamic",), ("quantize fp16",)),
    )


@hookimpl
def compressor_backends() -> Iterator[Backend]:
    yield backend()


@hookimpl
def compressor_identify(path: Path) -> str | None:
    if path.is_dir():
        return NAME if is_transformers_folder(path) else None
    return NAME if path.suffix.lower() in IDENTIFIED_SUFFIXES else None


@hookimpl
def compressor_load(path: Path, backend: str, context: Context) -> Model:
    from compressor_onnx.loading import load_network

    network, inputs = load_network(path, context.options, context.trust)
    return Model(NAME, path, _format(network), network, inputs)


def _format(network: Network) -> str:
    """What the handle holds right now: a torch model awaiting export, or an ONNX graph."""
    return "onnx" if network.graph is not None else "torch"


@hookimpl
def compressor_compress(model: Model, step: Step, context: Context) -> Model | None:
    from compressor_onnx.export import ensure_graph

    network: Network = dataclasses.replace(model.handle)
    notes, metadata = list(model.notes), dict(model.metadata)
    if step.technique == "prune":
        from compressor_onnx.pruning import prune_network

        if network.module is None:
            ensure_graph(network, context)
        sparsity = float(step.params["sparsity"])
        layers = prune_network(network, sparsity)
        if layers == 0:
            raise CompressionError("no Linear/Conv (MatMul/Gemm/Conv) weights to prune")
        notes.append(f"pruned {sparsity:g} of the weights of {layers} layers by magnitude, one-shot")
        metadata["pruned_layers"] = layers
    elif step.technique == "quantize":
        from compressor_onnx.quantization import quantize_graph

        graph = ensure_graph(network, context)
        with tempfile.TemporaryDirectory(prefix="quantize-", dir=context.workdir) as folder:
            network.graph = quantize_graph(graph, step, context, Path(folder))
        metadata["quantization"] = [*metadata.get("quantization", []), str(step)]
    else:
        return None
    return Model(NAME, model.source, _format(network), network, model.inputs, notes, metadata)


@hookimpl
def compressor_save(model: Model, destination: Path, context: Context) -> Artifact:
    import onnx

    from compressor_onnx.export import ensure_graph
    from compressor_onnx.quantization import LARGE_MODEL_BYTES, float_nodes

    graph = ensure_graph(model.handle, context)
    path = destination.with_suffix(".onnx")
    side_files: tuple[Path, ...] = ()
    if graph.ByteSize() > LARGE_MODEL_BYTES:
        data_file = path.with_name(f"{path.name}.data")
        onnx.save_model(graph, str(path), save_as_external_data=True, location=data_file.name)
        side_files = (data_file,)
    else:
        onnx.save_model(graph, str(path))
    model.metadata["opset"] = next(
        (entry.version for entry in graph.opset_import if entry.domain in ("", "ai.onnx")), None
    )
    model.metadata["float_nodes"] = float_nodes(graph)
    return Artifact(NAME, path, "onnx", side_files)


@hookimpl
def compressor_measure(
    artifact: Artifact, data: Dataset | None, settings: MeasureSettings
) -> Measurement:
    from compressor_onnx.measure import measure_artifact

    return measure_artifact(artifact, data, settings)


@hookimpl
def compressor_sample_models(directory: Path) -> Iterator[SampleModel]:
    from compressor_onnx.samples import FACTORY, write_digits_sample

    weights, eval_data, calibration = write_digits_sample(directory)
    yield SampleModel(
        backend=NAME,
        name="digits-mlp",
        path=weights,
        variants=(("quantize fp16",), ("quantize dynamic",), ("quantize int8",),
                  ("prune 0.5", "quantize dynamic")),
        eval_data=eval_data,
        calibration_data=calibration,
        options={"model_factory": FACTORY},
        description="MLP (64-64-10) on scikit-learn digits, saved as a state_dict",
    )

