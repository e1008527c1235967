"""Load PyTorch models for the torch backend into a
:class:`~compressor_frontends.pytorch.TorchModel`.

The PyTorch front end's loaders read them (:mod:`compressor_frontends.pytorch.loading`):
state dicts (``.pt``/``.pth``/``.bin``, ``.safetensors``) built by ``--set
model_factory``, ``torch.export`` archives (``.pt2``, pickled entries refused
without ``--trust``), transformers folders. Nothing is unpickled as code.
Two more come from this backend's own artifacts: a ``.pt2`` it saved (its input
and output names travel inside, ``extra/compressor.json``) and a
``.safetensors`` with a ``.torch.json`` manifest next to it (``saving.py``): a
factory the manifest names runs only once the user confirms it
(:func:`confirmed_recipe`), a transformers config only if its size fits the weights
and the memory (:func:`check_model_size`).
"""

from __future__ import annotations

import json
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

from compressor.plugin import (
    InvalidInputError,
    TensorSpec,
    UnsafeInputError,
    UnsupportedError,
    UsageError,
    first_line,
    import_factory,
)
from compressor_frontends.pytorch import TorchModel

#: The JSON member this backend writes into the ``.pt2`` archives it saves.
EXTRA_NAME = "compressor.json"
MANIFEST_SUFFIX = ".torch.json"
MANIFEST_FORMAT = "compressor-torch"
#: The saved facts are a few KB; far larger is not an archive this backend wrote.
MAX_FACTS_BYTES = 16 << 20
#: Files of other frameworks, refused before any loader converts them.
NOT_TORCH = (".onnx", ".keras", ".h5", ".hdf5", ".tflite")


def load_net(path: Path, options: dict[str, Any], trust: bool) -> tuple[TorchModel, tuple[TensorSpec, ...]]:
    """Read ``path`` (anything the onnx backend reads but ONNX graphs) as an eager torch model."""
    from compressor_frontends.pytorch.loading import (
        READ_SUFFIXES,
        is_transformers_folder,
        load_torch_model,
    )

    suffix = path.suffix.lower()
    if suffix in NOT_TORCH or (path.is_dir() and (path / "saved_model.pb").is_file()):
        other = "onnx" if suffix == ".onnx" else "tflite"
        raise UnsupportedError(f"not a PyTorch model; use --backend {other}", path)
    if suffix == ".safetensors" and manifest_path(path).is_file():
        return load_from_manifest(path, manifest_path(path), options, trust)
    if not path.is_dir() and suffix not in READ_SUFFIXES:
        raise InvalidInputError(f"unsupported file type {suffix!r} for the torch backend", path)
    saved = read_extra(path) if suffix == ".pt2" else None
    if saved is not None and set(saved.get("quantization", ())) & {"dynamic", "int8"}:
        from compressor_torch.quantize import import_torchao

        import_torchao()  # registers the torchao ops the program calls
    loaded, specs = load_torch_model(path, options, trust)
    recipe: dict[str, Any] = {}
    if loaded.exported_program is not None:
        module = loaded.exported_program.module()
        if saved is not None:
            net = TorchModel(module, input_names=tuple(saved["inputs"]), output_names=tuple(saved["outputs"]),
                             quantization=tuple(saved.get("quantization", ())), dtype="float32")
            return net, tuple(TensorSpec(s["name"], tuple(s["shape"]), s["dtype"]) for s in saved["specs"])
    else:
        module = loaded.module
        if path.is_dir() and is_transformers_folder(path):
            recipe = transformers_recipe(module)
        elif options.get("model_factory"):
            recipe = {"factory": str(options["model_factory"])}
    return TorchModel(
        module=module,
        input_names=loaded.input_names,
        keyword_inputs=loaded.keyword_inputs,
        sample_shapes=loaded.sample_shapes,
        optional_inputs=loaded.optional_inputs,
        output_names=loaded.output_names,
        recipe=recipe,
    ), specs


def transformers_recipe(module: Any) -> dict[str, Any]:
    return {"transformers": type(module).__name__, "config": module.config.to_dict()}


def manifest_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(path.suffix) + MANIFEST_SUFFIX)


def read_extra(path: Path) -> dict[str, Any] | None:
    """This backend's facts in a ``.pt2`` it saved (plain JSON, nothing unpickled), else None."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = [info for info in archive.infolist() if info.filename.endswith(f"/extra/{EXTRA_NAME}")]
            if not infos:
                return None
            if infos[0].file_size > MAX_FACTS_BYTES:
                raise ValueError(f"{infos[0].filename} declares {infos[0].file_size} bytes")
            facts = json.loads(archive.read(infos[0]))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError, RecursionError) as error:
        raise InvalidInputError(f"damaged .pt2 archive ({first_line(error)})", path) from None
    if not isinstance(facts, dict) or facts.get("format") != MANIFEST_FORMAT:
        return None
    return checked_facts(facts, path)


def checked_facts(facts: dict[str, Any], path: Path) -> dict[str, Any]:
    """``facts`` (a saved program's or a manifest's) if every field has the right type."""
    def names(key: str) -> bool:
        value = facts.get(key)
        return isinstance(value, list) and all(isinstance(item, str) for item in value)

    def spec(item: Any) -> bool:
        return (isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("dtype"), str)
                and isinstance(item.get("shape"), list)
                and all(dim is None or (isinstance(dim, int) and dim >= 0) for dim in item["shape"]))

    wrong = [key for key in ("inputs", "outputs", "quantization") if not names(key)]
    specs = facts.get("specs")
    if not isinstance(specs, list) or not all(spec(item) for item in specs):
        wrong.append("specs")
    if facts.get("dtype", "float32") not in ("float32", "float16"):
        wrong.append("dtype")
    modes = facts.get("quantization")
    if isinstance(modes, list) and (len(modes) > 1 or not set(modes) <= {"dynamic", "int8", "fp16"}):
        wrong.append("quantization")
    if wrong:
        raise InvalidInputError(f"the saved model's facts are damaged ({', '.join(wrong)})", path)
    return facts


def build_transformers(recipe: dict[str, Any], weights: Path | None = None) -> Any:
    """A transformers model of the recipe's class and config, with random weights.

    The config is a model file's word: before anything is allocated the model is
    built on the meta device and its parameters counted, then refused if the
    weights file cannot hold them (exit 4) or the machine cannot (exit 2)."""
    import torch
    import transformers

    cls = getattr(transformers, str(recipe["transformers"]), None)
    if not isinstance(cls, type) or not hasattr(cls, "config_class") or not hasattr(cls, "_from_config"):
        raise InvalidInputError(f"unknown transformers class {recipe['transformers']!r} in the manifest", weights)
    try:
        config = cls.config_class.from_dict(dict(recipe["config"]))
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            skeleton = cls._from_config(config, attn_implementation="eager")
    except Exception as error:  # noqa: BLE001 - transformers validates configs with any exception type
        raise InvalidInputError(f"the manifest's {recipe['transformers']} config cannot build a model "
                                f"({type(error).__name__}: {first_line(error)})", weights) from None
    parameters = sum(parameter.numel() for parameter in skeleton.parameters())
    del skeleton
    check_model_size(parameters, str(recipe["transformers"]), weights)
    try:
        return cls._from_config(config, attn_implementation="eager").eval()
    except (MemoryError, RuntimeError) as error:
        raise UsageError(f"not enough memory to build the manifest's {recipe['transformers']} "
                         f"({_gigabytes(parameters * 4)}: {first_line(error)})", weights) from None


#: What one parameter takes once built (the config's float32).
_BUILT_BYTES = 4


def check_model_size(parameters: int, what: str, weights: Path | None) -> None:
    """Refuse a model of ``parameters`` the weights file cannot hold (every parameter is
    loaded from it, strictly, at one byte or more) or this machine's memory cannot."""
    if weights is not None:
        stored = stored_values(weights)
        if parameters > stored:
            raise InvalidInputError(
                f"the manifest's config builds a {what} of {parameters:,} parameters "
                f"({_gigabytes(parameters * _BUILT_BYTES)}), but the weights hold {stored:,} values: "
                "not this file's model", weights)
    available = available_memory()
    if available is not None and parameters * _BUILT_BYTES > available:
        raise UsageError(f"building the manifest's {what} needs {_gigabytes(parameters * _BUILT_BYTES)} "
                         f"of memory, {_gigabytes(available)} available", weights)


def stored_values(weights: Path) -> int:
    """How many values the safetensors file holds, from its header (nothing loaded)."""
    import math

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as opened:
            return sum(math.prod(opened.get_slice(key).get_shape()) for key in opened.keys())  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise InvalidInputError(f"not a readable safetensors file ({first_line(error)})", weights) from None


def available_memory() -> int | None:
    """Memory the kernel says can be had without swapping (``MemAvailable``), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gigabytes(size: int) -> str:
    return f"{size / 1e9:,.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def build_from_recipe(recipe: dict[str, Any], weights: Path | None = None) -> Any:
    """The module's structure (the caller loads the saved weights into it). A factory
    recipe runs the factory: callers confirm it first (:func:`confirmed_recipe`)."""
    if "factory" in recipe:
        return _factory_module(str(recipe["factory"]))
    if "transformers" in recipe:
        return build_transformers(recipe, weights)
    raise InvalidInputError("the manifest names no way to build the model (no factory, no transformers class)")


def confirmed_recipe(recipe: dict[str, Any], manifest: Path, model_factory: object, trust: bool) -> dict[str, Any]:
    """The recipe to build from: a factory a manifest names is code chosen by a model
    file, so it runs only when the user names it too (``--set model_factory``) or
    passes ``--trust``; the user's own ``model_factory`` always wins over it. A
    transformers recipe names no code and needs no confirming."""
    if "factory" not in recipe:
        return recipe
    if model_factory:
        return {"factory": str(model_factory).strip()}
    if not trust:
        named = str(recipe["factory"])
        shown = named if re.fullmatch(r"[\w.]{1,200}:[\w.]{1,200}", named) else "<that name>"
        raise UnsafeInputError(
            f"names the factory {named[:200]!r} to build the model, and a model file does not choose the code "
            f"compressor runs: confirm it with --set model_factory={shown} (or pass --trust)", manifest)
    return recipe


def _factory_module(factory_name: str) -> Any:
    import torch

    module = import_factory(factory_name, "model_factory")()
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"model_factory {factory_name!r} returned {type(module).__name__}, not an nn.Module")
    return module.eval()


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        facts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise InvalidInputError(f"unreadable manifest ({first_line(error)})", path) from None
    if not isinstance(facts, dict) or facts.get("format") != MANIFEST_FORMAT:
        raise InvalidInputError(f"not a {MANIFEST_FORMAT} manifest", path)
    recipe = facts.get("recipe")
    if not (isinstance(recipe, dict) and (isinstance(recipe.get("factory"), str) or (
            isinstance(recipe.get("transformers"), str) and isinstance(recipe.get("config"), dict)))):
        raise InvalidInputError("the manifest names no way to build the model (recipe)", path)
    return checked_facts(facts, path)


def load_from_manifest(weights: Path, manifest: Path, options: dict[str, Any],
                       trust: bool) -> tuple[TorchModel, tuple[TensorSpec, ...]]:
    """A user's safetensors + manifest: a factory the manifest names is only a hint,
    built only once the user confirmed it (``confirmed_recipe``)."""
    facts = read_manifest(manifest)
    recipe = confirmed_recipe(facts["recipe"], manifest, options.get("model_factory"), trust)
    return rebuild_from_manifest(weights, manifest, {**facts, "recipe": recipe})


def rebuild_from_manifest(weights: Path, manifest: Path,
                          facts: dict[str, Any] | None = None) -> tuple[TorchModel, tuple[TensorSpec, ...]]:
    """The saved module: its structure built and quantized as the manifest says, then
    the saved tensors loaded into it (strictly).

    Without ``facts`` the manifest's recipe is followed as it is: for artifacts this
    run saved itself (the measuring child), whose factory the user confirmed when the
    model was loaded. A user's file goes through :func:`load_from_manifest`."""
    from compressor_frontends.pytorch.loading import load_safetensors
    from compressor_torch.quantize import linear_filter, torchao_config

    facts = facts if facts is not None else read_manifest(manifest)
    module = build_from_recipe(facts["recipe"], weights)
    quantization = tuple(facts.get("quantization") or ())
    if "fp16" in quantization:
        module = module.half()
    elif quantization:
        config = torchao_config(quantization[0])
        from torchao.quantization import quantize_
        from torchao.utils import unwrap_tensor_subclass

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(module, config, filter_fn=linear_filter())
        unwrap_tensor_subclass(module)
    state = load_safetensors(weights)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise InvalidInputError(f"the weights do not fit the rebuilt model ({first_line(error)})", weights) from None
    net = TorchModel(module.eval(), input_names=tuple(facts["inputs"]),
                     keyword_inputs=bool(facts.get("keyword_inputs")), output_names=tuple(facts["outputs"]),
                     recipe=dict(facts["recipe"]), quantization=quantization,
                     dtype=str(facts.get("dtype", "float32")))
    specs = tuple(TensorSpec(s["name"], tuple(s["shape"]), s["dtype"]) for s in facts["specs"])
    return net, specs
