"""The ``openvino`` backend: models compressed by NNCF and run by OpenVINO on the CPU.

Reads OpenVINO IR (``.xml`` and ``.bin``) and ONNX (``--backend openvino``: the onnx
backend claims ``.onnx`` by default); saves IR. ``quantize fp16``: fp16 weights;
``dynamic``: int8 weights (``nncf.compress_weights``); ``int8``: int8 weights and
activations calibrated on ``--calibration-data`` (``nncf.quantize``, transformer preset
for attention). PyTorch models will come through compressor's PyTorch front end (not
written yet; :data:`READS` and :func:`compressor_load` are the seam): export to ONNX.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from compressor.plugin import (
    Artifact,
    Backend,
    CompressionError,
    Context,
    InvalidInputError,
    MeasureSettings,
    Model,
    Param,
    Runtime,
    SampleModel,
    Step,
    Technique,
    TensorSpec,
    UnsafeInputError,
    UnsupportedError,
    examples_from_data,
    hookimpl,
    native_output_silenced,
)

NAME = "openvino"
READS = (".xml", ".onnx")  #: what compressor_load reads; the PyTorch front end will add torch models
CALIBRATION_LIMIT = 300  #: calibration examples nncf.quantize sees at most (its default subset)


@dataclass(frozen=True)
class Network:
    """The handle: an ``openvino.Model`` (never changed in place) and how to store its weights."""

    model: Any
    fp16: bool = False


@hookimpl
def compressor_backends() -> list[Backend]:
    return [Backend(
        name=NAME,
        description="ONNX and OpenVINO IR models, compressed by NNCF, run by OpenVINO on the CPU",
        formats=(".xml with its .bin (OpenVINO IR)", ".onnx with --backend openvino"),
        techniques={"quantize": Technique(
            "quantize",
            help="fp16 weights; dynamic: int8 weights (NNCF); int8: int8 weights and activations (NNCF)",
            modes=("fp16", "dynamic", "int8"),
            params={"model_type": Param(str, "auto", "int8: transformer preset (auto: attention in the graph)",
                                        choices=("auto", "transformer", "generic"))},
            requires_data={"int8": "calibration"},
            candidates=("quantize fp16", "quantize dynamic", "quantize int8"),
        )},
        options={"inference_precision": Param(
            str, "f32", "CPU inference precision; default: the device's (bf16 where the CPU has it)",
            choices=("f32", "bf16", "f16", "default"))},
        requires=("openvino", "nncf"), runtime_imports=("openvino",),
        distributions=("openvino", "nncf", "compressor-openvino"),
        default_variants=(("quantize fp16",), ("quantize dynamic",)),
    )]


@hookimpl
def compressor_identify(path: Path) -> str | None:
    if path.suffix.lower() != ".xml" or not path.is_file():
        return None
    with path.open("rb") as stream:
        return NAME if b"<net " in stream.read(512) else None


def openvino_message(error: BaseException) -> str:
    """OpenVINO's errors start with a source location; the reason is the last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(error).__name__


def tensor_spec(port: Any, path: Path | None = None) -> TensorSpec:
    if not port.get_names():
        raise InvalidInputError("a model input or output has no name", path)
    name, shape = min(port.get_names()), port.get_partial_shape()
    if shape.rank.is_dynamic:
        raise InvalidInputError(f"{name!r} has a dynamic rank, which compressor cannot feed", path)
    dims = tuple(dim.get_length() if dim.is_static else None for dim in shape)
    return TensorSpec(name, dims, port.get_element_type().to_dtype().name)


@hookimpl
def compressor_load(path: Path, backend: str, context: Context) -> Model:
    if path.suffix.lower() not in READS:
        raise UnsupportedError(f"the openvino backend reads {' and '.join(READS)} files; export PyTorch "
                               "models to ONNX first", path)
    import openvino as ov

    try:
        with native_output_silenced(stdout=False):  # other frontends' parsers complain natively
            model = ov.Core().read_model(str(path))
    except RuntimeError as error:
        message = openvino_message(error)
        raise (UnsafeInputError if "outside the base directory" in message else InvalidInputError)(
            message, path) from None
    files = [path, path.with_suffix(".bin")] if path.suffix.lower() == ".xml" else [path]
    return Model(NAME, path, "openvino", Network(model), tuple(tensor_spec(p, path) for p in model.inputs),
                 source_bytes=sum(file.stat().st_size for file in files if file.is_file()))


@hookimpl
def compressor_fork(model: Model, context: Context) -> Model:
    # compress clones the openvino.Model before changing it: every variant shares the load.
    return replace(model, notes=list(model.notes), metadata=dict(model.metadata))


def is_transformer(model: Any) -> bool:
    """Attention in the graph: an SDPA operation, or a Softmax fed (through scaling, masking,
    casts) by a MatMul of two activations: Q times K transposed."""
    for op in model.get_ordered_ops():
        if op.get_type_name() == "ScaledDotProductAttention":
            return True
        node = op.input_value(0).get_node() if op.get_type_name() == "Softmax" else None
        while node is not None and node.get_type_name() in ("Add", "Multiply", "Divide", "Convert", "Reshape"):
            node = node.input_value(0).get_node()
        if node is not None and node.get_type_name() == "MatMul" and all(
                value.get_node().get_type_name() != "Constant" for value in node.input_values()):
            return True
    return False


@hookimpl
def compressor_compress(model: Model, step: Step, context: Context) -> Model:
    network, notes, metadata = model.handle, list(model.notes), dict(model.metadata)
    if step.mode == "fp16":
        notes.append("fp16 weights (openvino.save_model compress_to_fp16)")
        return replace(model, handle=Network(network.model, fp16=True), notes=notes, metadata=metadata)
    import nncf

    if step.mode == "dynamic":
        notes.append("int8 weights, a scale and zero point per output channel (nncf.compress_weights)")
        apply = lambda: nncf.compress_weights(  # noqa: E731
            network.model.clone(), mode=nncf.CompressWeightsMode.INT8_ASYM)
    else:
        assert context.calibration_data is not None  # core refuses int8 without it (requires_data)
        examples = examples_from_data(context.calibration_data, model.inputs, context.options,
                                      limit=CALIBRATION_LIMIT)
        feeds = [examples.take(index, index + 1) for index in range(examples.count)]
        chosen = step.params["model_type"]
        transformer = chosen == "transformer" or (chosen == "auto" and is_transformer(network.model))
        metadata["model_type"] = "transformer" if transformer else "generic"
        notes.append(f"int8 weights and activations (nncf.quantize{', transformer preset' * transformer}), "
                     f"calibrated on {len(feeds)} examples")
        apply = lambda: nncf.quantize(  # noqa: E731
            network.model.clone(), nncf.Dataset(feeds), subset_size=len(feeds),
            model_type=nncf.ModelType.TRANSFORMER if transformer else None)
    try:
        with native_output_silenced():  # nncf's progress bars and statistics tables
            compressed = apply()
    except Exception as error:  # noqa: BLE001 - nncf failing on a valid model is this step failing
        raise CompressionError(f"nncf could not apply '{step}': {openvino_message(error)}") from None
    return replace(model, handle=Network(compressed, network.fp16), notes=notes, metadata=metadata)


def weight_bytes(path: Path) -> dict[str, int]:
    """Bytes of constants in a saved IR, by element type (``{"f16": 44032, "f32": 72}``)."""
    from xml.etree import ElementTree

    totals: dict[str, int] = {}
    for data in ElementTree.parse(path).getroot().iterfind("layers/layer[@type='Const']/data"):
        kind = data.get("element_type", "?")
        totals[kind] = totals.get(kind, 0) + int(data.get("size", 0))
    return dict(sorted(totals.items()))


@hookimpl
def compressor_save(model: Model, destination: Path, context: Context) -> Artifact:
    import openvino as ov

    xml = destination.with_suffix(".xml")
    ov.save_model(model.handle.model, str(xml), compress_to_fp16=model.handle.fp16)
    # What save learns reaches the report through the Artifact's metadata.
    facts = {"weight_bytes": weight_bytes(xml)}
    return Artifact(NAME, xml, "openvino-ir", side_files=(xml.with_suffix(".bin"),), metadata=facts)


class OpenVinoRuntime(Runtime):
    """A saved IR compiled for the CPU: core feeds it, times it and compares its outputs."""

    def __init__(self, artifact: Artifact, settings: MeasureSettings) -> None:
        import openvino as ov

        precision = settings.options.get("inference_precision", "f32")
        hint = {} if precision == "default" else {"INFERENCE_PRECISION_HINT": precision}
        self.compiled = ov.Core().compile_model(str(artifact.path), "CPU",
                                                {"INFERENCE_NUM_THREADS": settings.threads, **hint})
        self.inputs = tuple(tensor_spec(port, artifact.path) for port in self.compiled.inputs)
        self.outputs = tuple(tensor_spec(port, artifact.path) for port in self.compiled.outputs)
        self.version = ov.get_version().split("-")[0]

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        try:
            results = self.compiled(dict(feeds))
        except (RuntimeError, TypeError, ValueError) as error:
            raise InvalidInputError(openvino_message(error)) from None
        return {spec.name: results[port] for spec, port in zip(self.outputs, self.compiled.outputs)}  # copies

    def metrics(self) -> dict[str, Any]:
        precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        return {"runtime": f"OpenVINO {self.version} CPU", "inference_precision": precision}


@hookimpl
def compressor_open_runtime(artifact: Artifact, settings: MeasureSettings) -> Runtime:
    return OpenVinoRuntime(artifact, settings)


@hookimpl
def compressor_sample_models(directory: Path) -> list[SampleModel]:
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    node = x = ops.parameter([-1, 64], np.float32, name="x")
    for n_in, n_out in ((64, 256), (256, 256), (256, 10)):
        weights = (rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        node = ops.add(ops.matmul(node, ops.constant(weights), False, False),
                       ops.constant((rng.normal(size=n_out) * 0.1).astype(np.float32)))
        node = ops.relu(node) if n_out != 10 else node
    node.output(0).get_tensor().set_names({"logits"})
    model = ov.Model([node.output(0)], [x], "mlp")
    ov.save_model(model, str(directory / "mlp.xml"), compress_to_fp16=False)
    data = rng.normal(size=(600, 64)).astype(np.float32)
    logits = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(data[:400])[0]
    np.savez(directory / "eval.npz", x=data[:400], y=logits.argmax(1))
    np.savez(directory / "calibration.npz", x=data[400:])
    return [SampleModel(NAME, "mlp", directory / "mlp.xml", (("quantize fp16",), ("quantize dynamic",),
                        ("quantize int8",)), eval_data=directory / "eval.npz",
                        calibration_data=directory / "calibration.npz", description="64-256-256-10 MLP, IR")]
