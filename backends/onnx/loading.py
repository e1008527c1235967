"""Load ONNX graphs and PyTorch models into a :class:`Network`.

Formats: ``.onnx``; ``torch.export`` programs (``.pt2``); ``torch.save`` state
dicts (``.pt``/``.pth``/``.bin``) and ``.safetensors`` built by ``--set
model_factory``; TorchScript and fully pickled modules (only with ``--trust``);
Hugging Face transformers folders (``config.json`` + safetensors); Keras files and
SavedModel folders through tf2onnx (``from_keras.py``, only with ``--backend onnx``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from compressor import InvalidInputError, TensorSpec, UnsafeInputError, UsageError
from compressor.factories import import_factory
from compressor_onnx.safety import (
    TRUST_HINT,
    check_external_data,
    load_external_data,
    safe_torch_load,
    torch_file_kind,
)
from compressor_onnx.shapes import SampleShape, graph_input_specs, parse_input_shape

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ts", ".jit", ".ptl")


@dataclass
class ExportCache:
    """The torch model of one load and its ONNX export, shared by every fork.

    Exported once, on first use. Then :meth:`release` drops the torch model, here
    and in the loaded Network that still shows it (forks reach it only through
    the cache), so that its memory can go back: the export stands for it.
    """

    module: Any | None = None
    exported_program: Any | None = None
    graph: Any | None = None
    path: Path | None = None
    exports: int = 0
    #: Facts about the export for the report (seconds, peak RSS).
    metadata: dict[str, Any] = field(default_factory=dict)
    holders: list[Network] = field(default_factory=list, repr=False, compare=False)

    def release(self) -> None:
        for owner in (self, *self.holders):
            owner.module = owner.exported_program = None


@dataclass
class Network:
    """``Model.handle``: a torch model still to be exported, an in-memory ONNX
    graph, or (past the large-model threshold) an ONNX file on disk.

    Steps never modify a Network they are given: they return a new one.
    """

    module: Any | None = None
    graph: Any | None = None
    input_names: tuple[str, ...] = ()
    #: The exported graph's outputs; empty: named after what the module returns
    #: (``output`` for one tensor, ``output_0``... for a tuple, the keys of a dict).
    output_names: tuple[str, ...] = ()
    #: Example shapes for export when no data file gives real examples.
    sample_shapes: tuple[SampleShape, ...] = ()
    #: Call the module with keyword inputs (transformers models).
    keyword_inputs: bool = False
    #: ``torch.export`` programs only export through the dynamo exporter.
    exported_program: Any | None = None
    #: A large model: an ONNX file whose weights sit in external data next to it
    #: (the user's checked file, or one compressor wrote in its scratch folder).
    path: Path | None = None
    #: Shared by a loaded torch model and all its forks (see ExportCache).
    export: ExportCache | None = None
    #: Inputs the model has defaults for (a transformer's token_type_ids): exported
    #: only when the data has them.
    optional_inputs: frozenset[str] = frozenset()
    #: The loaded file's bytes with its external data (ONNX files).
    source_bytes: int | None = None

    @property
    def is_torch(self) -> bool:
        return self.graph is None and self.path is None


def is_transformers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def load_network(path: Path, options: dict[str, Any], trust: bool) -> tuple[Network, tuple[TensorSpec, ...]]:
    """Read ``path`` into a Network and the TensorSpecs of its inputs."""
    declared = parse_input_shape(options["input_shape"]) if options.get("input_shape") else ()
    from compressor_onnx import from_keras

    if from_keras.reads(path):
        return from_keras.load_keras_network(path, options, trust)
    if path.is_dir():
        if not is_transformers_folder(path):
            raise InvalidInputError(
                "folder is not a transformers model (needs config.json and *.safetensors)", path
            )
        from compressor_onnx.hf import load_transformers

        return load_transformers(path, declared)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return load_onnx_network(path)
    if suffix == ".pt2":
        return load_exported_program(path, trust)
    if suffix == ".safetensors":
        module = build_from_factory(path, load_safetensors(path), options)
        return _module_network(module, declared, path)
    if suffix in TORCH_SUFFIXES:
        return _module_network(load_torch_file(path, options, trust), declared, path)
    raise InvalidInputError(f"unsupported file type {suffix!r} for the onnx backend", path)


def _module_network(module: Any, declared: tuple[SampleShape, ...],
                    path: Path) -> tuple[Network, tuple[TensorSpec, ...]]:
    names = tuple(sample.name for sample in declared)
    if not names:
        wanted = forward_input_names(module)
        if len(wanted) > 1:
            example = ";".join(f"{name}:1,16" for name in wanted)
            raise UsageError(f"the model's forward() takes {len(wanted)} inputs ({', '.join(wanted)}): declare "
                             f"them with --set input_shape='{example}' (your shapes; data files then hold an "
                             "array named after each)", path)
        names = ("x",)
    network = Network(module=module.eval(), input_names=names, sample_shapes=declared)
    return network, tuple(sample.spec for sample in declared)


def load_onnx_network(path: Path) -> tuple[Network, tuple[TensorSpec, ...]]:
    """An ONNX file as an in-memory graph, or by path past the large-model threshold."""
    from compressor_onnx.external import model_bytes
    from compressor_onnx.quantization import large_model_bytes

    skeleton = _parse_onnx(path)
    specs = graph_input_specs(skeleton.graph, path)
    size = model_bytes(path, skeleton)
    if size > large_model_bytes():
        # Checked by path: the checker then reads no weights, and a proto past
        # 2 GB never has to be serialized.
        _check_onnx(path, path)
        return Network(path=path, source_bytes=size), specs
    return Network(graph=_with_external_data(skeleton, path), source_bytes=size), specs


def load_onnx(path: Path) -> Any:
    """Parse an ONNX file into memory, checking external data before anything reads it."""
    return _with_external_data(_parse_onnx(path), path)


def _parse_onnx(path: Path) -> Any:
    """The graph without external data, whose locations are checked before anyone follows them."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        graph = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as error:
        raise InvalidInputError(f"not a readable ONNX model ({type(error).__name__})", path) from None
    if not graph.graph.node or not graph.opset_import:
        raise InvalidInputError("not an ONNX model (no graph nodes or opset)", path)
    check_external_data(graph, path)
    return graph


def _with_external_data(graph: Any, path: Path) -> Any:
    """The graph with its external tensors read in, each file opened once and checked as
    opened (``safety.load_external_data``), never by onnx following names itself."""
    try:
        load_external_data(graph, path)
    except (ValueError, OSError) as error:
        _invalid(error, path)
    _check_onnx(graph, path)
    return graph


def _check_onnx(graph_or_path: Any, path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(graph_or_path) if isinstance(graph_or_path, Path) else graph_or_path)
    except (onnx.checker.ValidationError, ValueError, OSError, RuntimeError) as error:
        _invalid(error, path)


def _invalid(error: Exception, path: Path) -> NoReturn:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    raise InvalidInputError(f"invalid ONNX model ({first_line[:200]})", path) from None


def load_exported_program(path: Path, trust: bool) -> tuple[Network, tuple[TensorSpec, ...]]:
    from compressor_onnx.pt2 import load_program
    from compressor_onnx.safety import zip_members

    zip_members(path)
    program = load_program(path, trust)
    names = tuple(spec.arg.name for spec in program.graph_signature.input_specs
                  if spec.kind.name == "USER_INPUT")
    examples = program.example_inputs[0] if program.example_inputs else ()
    shapes = tuple(
        SampleShape(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
        for name, tensor in zip(names, examples)
    )
    # The program's own output names, kept when a torch step's module is exported again.
    outputs = tuple(str(name) for name in program.graph_signature.user_outputs)
    network = Network(input_names=names, output_names=outputs if all(outputs) else (), sample_shapes=shapes,
                      exported_program=program)
    return network, tuple(sample.spec for sample in shapes)


def load_torch_file(path: Path, options: dict[str, Any], trust: bool) -> Any:
    """A module from TorchScript (trusted), a full pickle (trusted) or a state dict."""
    import torch

    kind = torch_file_kind(path)
    if kind == "torchscript":
        if not trust:
            raise UnsafeInputError(
                "this is a TorchScript archive: loading it runs the code stored in it; " + TRUST_HINT,
                path,
            )
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except Exception as error:  # noqa: BLE001 - the TorchScript loader raises RuntimeError and more
            raise InvalidInputError(f"unreadable TorchScript archive ({type(error).__name__})", path) from None
    loaded = safe_torch_load(path, trust)
    if isinstance(loaded, torch.nn.Module):
        return loaded
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if isinstance(loaded, dict) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return build_from_factory(path, loaded, options)
    raise InvalidInputError(
        f"holds a {type(loaded).__name__}, not a module or a state_dict of tensors", path
    )


def load_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise InvalidInputError(f"not a readable safetensors file ({error})", path) from None


def build_from_factory(path: Path, state_dict: dict[str, Any], options: dict[str, Any]) -> Any:
    """Build the module named by ``model_factory`` and load ``state_dict`` into it."""
    import torch

    factory_name = options.get("model_factory")
    if not factory_name:
        raise UsageError(
            "this file is a state_dict (weights only); tell how to build the module with "
            "--set model_factory=package.module:function",
            path,
        )
    module = import_factory(factory_name, "model_factory")()
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"model_factory {factory_name!r} returned {type(module).__name__}, not an nn.Module")
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise InvalidInputError(
            f"weights do not fit the module from {factory_name}: "
            + "; ".join(f"{what} {_first_keys(keys)}" for what, keys in
                        (("missing", missing), ("unexpected", unexpected)) if keys),
            path,
        )
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise InvalidInputError(
            f"weights do not fit the module from {factory_name} ({_shape_problem(error)})", path
        ) from None
    return module


def _first_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} key(s): {shown}" + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _shape_problem(error: RuntimeError) -> str:
    """The size mismatches torch lists after its first line, up to ten of them."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    mismatches = [line for line in lines if line.startswith("size mismatch")]
    return "; ".join(mismatches[:10]) if mismatches else (lines[0][:200] if lines else type(error).__name__)


def forward_input_names(module: Any) -> tuple[str, ...]:
    """A plain module's ``forward`` required positional arguments by name where there are
    several (``forward(self, x, state)``: a stateful model's ``x`` and ``state``), else ``x``."""
    import inspect

    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # a TorchScript or C++ forward
        return ("x",)
    names = []
    for parameter in parameters:
        if (parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
                or parameter.default is not parameter.empty):
            break
        names.append(parameter.name)
    return tuple(names) if len(names) >= 2 else ("x",)
