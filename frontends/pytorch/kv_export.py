"""Generation-ready ONNX export of a transformers causal language model.

One graph serves prefill and decode, in the layout Optimum and ONNX Runtime GenAI use:

* inputs ``input_ids [batch, sequence]``, ``attention_mask [batch, past + sequence]``,
  ``position_ids [batch, sequence]`` (where the model's ``forward`` takes them), then
  ``past_key_values.{i}.key`` and ``past_key_values.{i}.value``, each
  ``[batch, kv_heads, past_sequence, head_dim]``;
* outputs ``logits [batch, sequence, vocabulary]``, then ``present.{i}.key`` and
  ``present.{i}.value`` ``[batch, kv_heads, past + sequence, head_dim]``.

Prefill feeds past tensors of length 0. The model is wrapped in a module taking the past
as flat tensors and building transformers' ``DynamicCache`` inside, so the TorchScript
exporter (``dynamo=False``, the reliable path for these graphs) sees tensors only. The
cache's shapes (layers, key/value heads, head size) are read from one short run of the
model rather than from its config, so grouped-query attention and any ``head_dim`` come out
right whatever the architecture calls them.

The onnx backend then rewrites each layer's attention into ONNX Runtime's fused
``GroupQueryAttention`` (and ``RotaryEmbedding``) where a check on a miniature of the model
shows the outputs unchanged (:mod:`compressor_onnx.kv_fusion_export`): inputs and outputs
stay as listed here.
"""

from __future__ import annotations

import inspect
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.plugin import CompressionError, Context, first_line, native_output_silenced
from compressor_frontends.pytorch.model import TorchModel
from compressor_frontends.pytorch.weight_streaming import streamed_weights

#: Names of the cache tensors in the graph (Optimum's and ONNX Runtime GenAI's).
PAST_NAME = "past_key_values.{layer}.{kind}"
PRESENT_NAME = "present.{layer}.{kind}"
#: The shapes traced: a batch of two, a past of three tokens and five new ones, so that no
#: axis the graph keeps dynamic is traced at a size the exporter could fold (0 or 1).
_TRACE_BATCH, _TRACE_PAST, _TRACE_NEW = 2, 3, 5


#: The graph's metadata entry holding the tokens of context the model has positions for.
MAX_POSITIONS_KEY = "compressor.max_positions"


def max_positions(module: Any) -> int | None:
    """The longest context the model's config declares (GPT-2's ``n_positions``), or None."""
    config = getattr(module, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class CacheShape:
    """What a model's key/value cache looks like."""

    layers: int
    kv_heads: int
    head_dim: int
    vocabulary: int


def is_causal_lm(module: Any) -> bool:
    """A transformers decoder-only model that generates (``GPT2LMHeadModel``,
    ``LlamaForCausalLM``...): an encoder-decoder or an encoder never is."""
    config = getattr(module, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    can_generate = getattr(module, "can_generate", None)
    try:
        generates = bool(can_generate()) if callable(can_generate) else False
    except Exception:  # noqa: BLE001 - a model's own override may raise anything
        return False
    return generates and _cache_keyword(module) is not None


def has_uniform_cache(module: Any) -> bool:
    """Whether every layer keeps a cache of one shape (not so after pruning heads per layer)."""
    try:
        probe_cache(module)
    except CompressionError:
        return False
    return True


def _cache_keyword(module: Any) -> str | None:
    """The keyword ``forward`` takes the cache by (transformers renamed it ``cache``)."""
    accepted = inspect.signature(module.forward).parameters
    return next((name for name in ("past_key_values", "cache") if name in accepted), None)


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """The past inputs and present outputs, key then value for each layer in order."""
    past = [PAST_NAME.format(layer=i, kind=kind) for i in range(layers) for kind in ("key", "value")]
    present = [PRESENT_NAME.format(layer=i, kind=kind) for i in range(layers) for kind in ("key", "value")]
    return past, present


def _returned_cache(output: Any) -> Any:
    cache = getattr(output, "past_key_values", None)
    return cache if cache is not None else getattr(output, "cache", None)


def _layer_tensors(cache: Any) -> list[Any]:
    """A transformers cache as flat tensors: layer 0 key, layer 0 value, layer 1 key..."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [tensor for layer in layers for tensor in (layer.keys, layer.values)]
    return [tensor for pair in cache for tensor in pair]  # a legacy tuple of (key, value) pairs


def probe_cache(module: Any) -> CacheShape:
    """Run the model on two tokens and read its cache's shape."""
    import torch

    keyword = _cache_keyword(module)
    with torch.no_grad():
        output = module(input_ids=torch.zeros((1, 2), dtype=torch.int64), use_cache=True)
    cache = _returned_cache(output) if keyword else None
    tensors = _layer_tensors(cache) if cache is not None else []
    if not tensors or any(tensor is None or tensor.ndim != 4 for tensor in tensors):
        raise CompressionError("this language model returned no key/value cache of [batch, heads, sequence, "
                               "head_dim] tensors; export it without one (--set kv_cache=false)")
    shapes = {tuple(tensor.shape[1:2]) + tuple(tensor.shape[3:]) for tensor in tensors}
    if len(shapes) != 1:
        raise CompressionError("this language model's layers keep key/value caches of different shapes "
                               f"({sorted(shapes)}); export it without one (--set kv_cache=false)")
    kv_heads, head_dim = next(iter(shapes))
    return CacheShape(len(tensors) // 2, int(kv_heads), int(head_dim), int(output.logits.shape[-1]))


def cached_forward(module: Any, token_inputs: tuple[str, ...], layers: int) -> Any:
    """A module taking the token inputs then the flat past, returning logits then the flat present."""
    import torch
    from transformers.cache_utils import DynamicCache

    keyword = _cache_keyword(module)

    class CachedForward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = module

        def forward(self, *tensors: Any) -> Any:
            named = dict(zip(token_inputs, tensors))
            past = tensors[len(token_inputs):]
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(layers)],
                                 config=self.model.config)
            output = self.model(**named, **{keyword: cache}, use_cache=True)
            return (output.logits, *_layer_tensors(_returned_cache(output)))

    return CachedForward().eval()


def export_with_cache(model: TorchModel, context: Context) -> tuple[Any | None, Path | None]:
    """Export the causal LM with its cache: ``(graph, None)``, or ``(None, path)`` for a large
    one (a file in a new folder of ``context.workdir``), as :func:`~.export.export_onnx`."""
    import onnx

    from compressor_frontends.pytorch.export import DEFAULT_OPSET, large_model_bytes

    opset = int(context.options.get("opset") or DEFAULT_OPSET)
    folder = Path(tempfile.mkdtemp(prefix="export-", dir=context.workdir))
    target = folder / "exported.onnx"
    try:
        _export(model, target, opset)
        large = sum(entry.stat().st_size for entry in folder.iterdir()) > large_model_bytes()
        graph = onnx.load(str(target), load_external_data=not large)
        limit = max_positions(model.module)
        if limit:
            onnx.helper.set_model_props(graph, {MAX_POSITIONS_KEY: str(limit)})
        if large:
            onnx.save_model(graph, str(target))  # the graph alone: its external data stays as written
            return None, target
        shutil.rmtree(folder, ignore_errors=True)
        return graph, None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _export(model: TorchModel, target: Path, opset: int) -> None:
    import torch

    module = model.module
    accepted = inspect.signature(module.forward).parameters
    token_inputs = tuple(name for name in ("input_ids", "attention_mask", "position_ids") if name in accepted)
    shape = probe_cache(module)
    past_names, present_names = cache_names(shape.layers)
    generator = torch.Generator().manual_seed(0)
    batch, past, new = _TRACE_BATCH, _TRACE_PAST, _TRACE_NEW
    examples = {
        "input_ids": torch.randint(0, shape.vocabulary, (batch, new), generator=generator),
        "attention_mask": torch.ones((batch, past + new), dtype=torch.int64),
        "position_ids": torch.arange(past, past + new, dtype=torch.int64).expand(batch, new).contiguous(),
    }
    cache = [torch.randn((batch, shape.kv_heads, past, shape.head_dim), generator=generator)
             for _ in past_names]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    axes = {name: axes[name] for name in (*token_inputs, "logits")}
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in past_names})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in present_names})
    wrapper = cached_forward(module, token_inputs, shape.layers)
    try:
        with warnings.catch_warnings(), torch.no_grad(), native_output_silenced(stderr=False), \
                streamed_weights(module, target):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, (*(examples[name] for name in token_inputs), *cache), str(target),
                input_names=[*token_inputs, *past_names], output_names=["logits", *present_names],
                dynamic_axes=axes, opset_version=opset, dynamo=False,
            )
    except Exception as error:  # noqa: BLE001 - the exporter raises anything a model's code can
        raise CompressionError(f"ONNX export with a key/value cache failed ({type(error).__name__}: "
                               f"{first_line(error)}); --set kv_cache=false exports without one") from None
    finally:
        module.eval()  # the exporter puts the wrapper back in the mode it found it in
