"""Hugging Face transformers folders (``config.json`` + safetensors), loaded as the
class their config names: an encoder, a classifier, a causal language model.

* The class is ``config.architectures[0]`` when transformers has it (``BertModel``,
  ``GPT2LMHeadModel``, ``BertForSequenceClassification``...), else ``AutoModel``:
  so a causal LM exports its ``logits`` and is compared by next-token agreement.
* The inputs are the tokenizer's (``model_input_names`` from the folder's
  tokenizer config, e.g. GPT-2: ``input_ids, attention_mask``), else those of
  ``input_ids, attention_mask, token_type_ids`` the model's ``forward`` takes.
  All but ``input_ids`` are optional: the framework has defaults for them
  (``token_type_ids`` are zeros), so data may leave them out.
* Safetensors only, no remote code, and a checkpoint that lacks weights of the
  model is refused (random weights would be compressed and measured without a
  word). ``use_cache`` is off for the one-pass export; a causal LM's
  generation-ready export passes its cache explicitly (:mod:`.kv_export`).
* Refused before transformers reads anything: a class mapped to the folder's own
  code (``auto_map``, exit 3), a shard index naming files outside the folder
  (exit 3), a config nested past the recursion limit (exit 4).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from compressor.plugin import InvalidInputError, TensorSpec, UnsafeInputError, first_line
from compressor_frontends.pytorch.model import TorchModel
from compressor_frontends.pytorch.shapes import SampleShape

HF_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: Token inputs exported from a transformers folder when no data gives a shape.
HF_SAMPLE_SHAPE = (1, 16)
#: Missing tensors named in the error, at most.
MAX_NAMED = 10


def read_json(path: Path, name: str) -> Any:
    """``name`` in the folder, parsed; unreadable or nested past Python's recursion limit
    (a few thousand levels, no real config) is exit 4."""
    try:
        return json.loads((path / name).read_text(encoding="utf-8"))
    except RecursionError:
        raise InvalidInputError(f"has a {name} nested too deeply to read", path) from None
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"has an unreadable {name} ({first_line(error)})", path) from None


def refuse_custom_code(path: Path, config: Any) -> None:
    """A config whose classes are not built into transformers but mapped to code
    shipped in the folder (``auto_map``): refused, exit 3, never loaded."""
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if auto_map:
        named = ", ".join(sorted(str(key) for key in auto_map)) if isinstance(auto_map, dict) else "classes"
        raise UnsafeInputError(
            f"config.json maps {named[:200]} to code shipped in the folder (auto_map): compressor never runs a "
            "model folder's own code (trust_remote_code); use a model transformers has built in", path)


def check_shards(path: Path) -> None:
    """Refuse (exit 3) a shard index naming files outside the folder, which transformers
    would open wherever they are."""
    for index in sorted(path.glob("*.safetensors.index.json")):
        facts = read_json(path, index.name) if index.is_file() else {}
        weight_map = facts.get("weight_map") if isinstance(facts, dict) else None
        if not isinstance(weight_map, dict):
            raise InvalidInputError(f"{index.name} has no weight_map of tensor names to files", path)
        for shard in sorted({str(value) for value in weight_map.values()}):
            if not _inside(path, shard):
                raise UnsafeInputError(f"{index.name} points at {shard[:120]!r}, outside the model's folder; "
                                       "shards must sit in the folder itself", path)


def _inside(folder: Path, name: str) -> bool:
    """A shard named by a plain file name in ``folder``: no separators, ``..`` or
    absolute paths, and (symlinks resolved) still in the folder, or in the Hugging
    Face cache's ``blobs`` of the same repository when the folder is a cache snapshot."""
    if not name or name != Path(name).name or name in (".", "..") or "\\" in name:
        return False
    target = folder / name
    if not target.is_symlink():
        return True
    resolved, root = target.resolve(), folder.resolve()
    snapshots = root.parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--"):
        root = snapshots.parent
    return resolved.is_relative_to(root)


def model_class(path: Path) -> tuple[Any, str]:
    """The transformers class for the folder's config, and its name."""
    import transformers

    config = read_json(path, "config.json")
    check_shards(path)
    architectures = config.get("architectures") if isinstance(config, dict) else None
    for name in architectures if isinstance(architectures, list) else []:
        found = getattr(transformers, str(name), None)
        if isinstance(found, type) and hasattr(found, "from_pretrained"):
            return found, str(name)
    # AutoModel would follow auto_map; a built-in class above never does.
    refuse_custom_code(path, config)
    return transformers.AutoModel, "AutoModel"


def tokenizer_inputs(path: Path) -> tuple[str, ...] | None:
    """``model_input_names`` of the folder's tokenizer, read from its config, None if unknown."""
    import transformers

    config_file = path / "tokenizer_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    except RecursionError:
        raise InvalidInputError(f"has a {config_file.name} nested too deeply to read", path) from None
    except (OSError, ValueError):
        return None
    names = config.get("model_input_names") if isinstance(config, dict) else None
    if isinstance(names, list) and all(isinstance(name, str) for name in names):
        return tuple(names)
    tokenizer_class = getattr(transformers, str(config.get("tokenizer_class", "")), None)
    default = getattr(tokenizer_class, "model_input_names", None)
    return tuple(default) if isinstance(default, list | tuple) else None


def load_transformers(path: Path, declared: tuple[SampleShape, ...]) -> tuple[TorchModel, tuple[TensorSpec, ...]]:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    cls, class_name = model_class(path)
    try:
        # Eager attention exports as plain MatMul/Softmax; the SDPA export adds mask
        # handling (IsNaN, Where) that quantized graphs keep: measured 31 ms vs 36 ms
        # for all-MiniLM-L6-v2 dynamic int8 at batch 1, sequence 128 (fp32 unchanged).
        module, info = cls.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False, use_safetensors=True,
            attn_implementation="eager", output_loading_info=True,
        )
    except Exception as error:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError...
        raise InvalidInputError(
            f"cannot load the transformers model ({type(error).__name__}: {first_line(error)})", path
        ) from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:MAX_NAMED]) + (f" and {len(missing) - MAX_NAMED} more" if len(missing) > MAX_NAMED else "")
        raise InvalidInputError(
            f"the checkpoint lacks {len(missing)} weight(s) of {class_name} ({shown}); "
            "they would be random", path,
        )
    if getattr(module.config, "use_cache", None):
        module.config.use_cache = False  # no key-value cache outputs in the one-pass export
    accepted = inspect.signature(module.forward).parameters
    wanted = tokenizer_inputs(path) or HF_INPUTS
    names = tuple(name for name in wanted if name in accepted) or tuple(n for n in HF_INPUTS if n in accepted)
    shapes = declared or tuple(SampleShape(name, HF_SAMPLE_SHAPE, "int64") for name in names)
    optional = frozenset(sample.name for sample in shapes if sample.name != "input_ids")
    model = TorchModel(
        module=module.eval(),
        input_names=tuple(sample.name for sample in shapes),
        output_names=(),
        sample_shapes=shapes,
        keyword_inputs=True,
        optional_inputs=optional,
    )
    specs = tuple(
        TensorSpec(sample.name, sample.spec.shape, sample.dtype, optional=sample.name in optional)
        for sample in shapes
    )
    return model, specs
