"""Load PyTorch models into a :class:`~compressor_frontends.pytorch.TorchModel`, safely.

Formats: ``torch.export`` programs (``.pt2``, pickled entries refused without
``--trust``: :mod:`compressor_frontends.pytorch.pt2`); ``torch.save`` state dicts
(``.pt``/``.pth``/``.bin``) and ``.safetensors`` built by ``--set model_factory``;
TorchScript and fully pickled modules (only with ``--trust``); Hugging Face
transformers folders (``config.json`` + safetensors: :mod:`compressor_frontends.pytorch.hf`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compressor.plugin import (
    InvalidInputError,
    TensorSpec,
    UnsafeInputError,
    UsageError,
    import_factory,
)
from compressor_frontends.pytorch.model import TorchModel
from compressor_frontends.pytorch.safety import TRUST_HINT, safe_torch_load, torch_file_kind
from compressor_frontends.pytorch.shapes import SampleShape, parse_input_shape

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ts", ".jit", ".ptl")
#: Every file suffix :func:`load_torch_model` reads (besides transformers folders).
READ_SUFFIXES = (".pt2", ".safetensors", *TORCH_SUFFIXES)


def is_transformers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def load_torch_model(path: Path, options: dict[str, Any], trust: bool) -> tuple[TorchModel, tuple[TensorSpec, ...]]:
    """Read ``path`` (a file of :data:`READ_SUFFIXES` or a transformers folder) into a
    TorchModel and the TensorSpecs of its inputs."""
    from compressor_frontends.pytorch.caches import torch_caches_in_scratch

    with torch_caches_in_scratch():
        return _load_torch_model(path, options, trust)


def _load_torch_model(path: Path, options: dict[str, Any], trust: bool) -> tuple[TorchModel, tuple[TensorSpec, ...]]:
    declared = parse_input_shape(options["input_shape"]) if options.get("input_shape") else ()
    if path.is_dir():
        if not is_transformers_folder(path):
            raise InvalidInputError(
                "folder is not a transformers model (needs config.json and *.safetensors)", path
            )
        from compressor_frontends.pytorch.hf import load_transformers

        return load_transformers(path, declared)
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        return load_exported_program(path, trust)
    if suffix == ".safetensors":
        module = build_from_factory(path, load_safetensors(path), options)
        return _module_model(module, declared, path)
    if suffix in TORCH_SUFFIXES:
        return _module_model(load_torch_file(path, options, trust), declared, path)
    raise InvalidInputError(f"unsupported file type {suffix!r} for a PyTorch model", path)


def _module_model(module: Any, declared: tuple[SampleShape, ...],
                  path: Path) -> tuple[TorchModel, tuple[TensorSpec, ...]]:
    names = tuple(sample.name for sample in declared)
    if not names:
        wanted = forward_input_names(module)
        if len(wanted) > 1:
            example = ";".join(f"{name}:1,16" for name in wanted)
            raise UsageError(f"the model's forward() takes {len(wanted)} inputs ({', '.join(wanted)}): declare "
                             f"them with --set input_shape='{example}' (your shapes; data files then hold an "
                             "array named after each)", path)
        names = ("x",)
    model = TorchModel(module=module.eval(), input_names=names, sample_shapes=declared)
    return model, tuple(sample.spec for sample in declared)


def load_exported_program(path: Path, trust: bool) -> tuple[TorchModel, tuple[TensorSpec, ...]]:
    from compressor_frontends.pytorch.pt2 import load_program
    from compressor_frontends.pytorch.safety import zip_members

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
    model = TorchModel(input_names=names, output_names=outputs if all(outputs) else (), sample_shapes=shapes,
                       exported_program=program)
    return model, tuple(sample.spec for sample in shapes)


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
