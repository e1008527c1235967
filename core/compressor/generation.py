"""A causal language model measured as it is deployed: generating, with its key/value cache.

For a runtime with a cache (:attr:`compressor.runtime.Runtime.kv_cache`, a
:class:`~compressor.kv_layout.KVCacheLayout`), the measuring process also:

* takes ``generation_prompts`` prompts of ``prompt_tokens`` tokens from the data's token
  ids (``input_ids`` rows joined, padding left out; fewer or shorter where the data holds
  less, random tokens without data) and generates ``new_tokens`` greedily at batch 1, never
  stopping early (every variant decodes as many tokens, so speeds compare);
* times the prefill (``ttft_ms``: time to first token, median over prompts, argmax included)
  and the decode steps (``decode_tokens_per_s``: tokens after the first over their time);
* measures the memory bandwidth (:mod:`compressor.bandwidth`, or ``--set
  memory_bandwidth_gbs=``) and states the decode speed as a share of the bound
  ``bandwidth / weight bytes`` (``bandwidth_share``), where the weights are at least twice the
  CPU's largest cache (smaller ones are read from cache, and no memory bound holds);
* scores ``perplexity_tokens`` tokens of the data with a sliding window of
  ``perplexity_window`` tokens (half a window of context for every token after the first
  window, as Hugging Face's perplexity guide does): ``window_perplexity``.

The generated tokens and the window's top-1 predictions go back to the parent, which
compares them with the original's (:func:`compare_generation`): ``greedy_agreement`` (the
share of tokens generated before the first divergence, mean over prompts),
``greedy_exact`` (the share of prompts generated identically) and
``next_token_agreement`` (top-1 over the perplexity windows). The original's process also
sends its top tokens at every scored position, which the variants' processes get back
(:func:`compressor.evaluation.with_original_tasks`) to compute ``kl_divergence``
(:mod:`compressor.token_divergence`), with the memory bandwidth it measured: one bound for
all. ``--set task=generate`` requires generation. Framework-free: NumPy and the runtime's
``run`` only.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from compressor.kv_layout import KVCacheLayout, TokenDecoder
from compressor.models import Dataset, MeasureSettings
from compressor.runtime import Runtime
from compressor.specs import Param
from compressor.token_divergence import REFERENCE_OPTION

#: ``--set`` options of generation; a backend whose runtimes have a cache declares them
#: (``options={**GENERATION_OPTIONS, ...}``).
GENERATION_OPTIONS: dict[str, Param] = {
    "generate": Param(bool, True, "causal LMs with a key/value cache: measure generation (time to first token, "
                      "decode tokens/s, greedy agreement, perplexity)"),
    "prompt_tokens": Param(int, 128, "generation: prompt length in tokens (at most what the data holds)",
                           minimum=1),
    "new_tokens": Param(int, 64, "generation: tokens generated greedily after each prompt", minimum=2),
    "generation_prompts": Param(int, 4, "generation: prompts taken from the data", minimum=1, maximum=1000),
    "perplexity_tokens": Param(int, 1024, "generation: data tokens scored for perplexity (0: none)", minimum=0),
    "perplexity_window": Param(int, 256, "generation: the sliding window of the perplexity, in tokens", minimum=2),
    "memory_bandwidth_gbs": Param(float, None, "generation: this machine's memory bandwidth in GB/s (default: "
                                  "measured)", minimum=0),
}
#: What the measuring process sends the parent for the comparison; not figures of the report.
RAW_KEYS = ("generation_tokens", "window_top1", "window_topk_ids", "window_topk_logprobs")


@dataclass
class Generated:
    """One prompt's greedy generation and its times."""

    tokens: list[int]
    first_token_s: float
    decode_s: float


def option(settings: MeasureSettings, name: str) -> Any:
    value = settings.options.get(name)
    return GENERATION_OPTIONS[name].default if value is None else value


def measure_generation(runtime: Runtime, data: Dataset | None, settings: MeasureSettings) -> dict[str, Any]:
    """Generation figures of a runtime with a cache (see the module docstring); ``{}`` without one."""
    from compressor.memory import peak_rss_bytes

    decoder = decoder_of(runtime)
    required = settings.options.get("task") == "generate"
    if required and decoder is None:
        from compressor.errors import UnsupportedError

        raise UnsupportedError("--set task=generate: this runtime cannot generate (it has no key/value cache; "
                               "a Hugging Face causal LM is exported with one unless --set kv_cache=false)")
    if decoder is None or not (required or _truthy(option(settings, "generate"))):
        return {}
    new_tokens = int(option(settings, "new_tokens"))
    prompt_tokens = int(option(settings, "prompt_tokens"))
    if decoder.max_positions:
        new_tokens = max(2, min(new_tokens, decoder.max_positions // 2))
        prompt_tokens = max(1, min(prompt_tokens, decoder.max_positions - new_tokens))
    stream = token_stream(data, getattr(runtime, "kv_cache", None))
    prompts = choose_prompts(stream, prompt_tokens, int(option(settings, "generation_prompts")),
                             _vocabulary(runtime, decoder), seed=0)
    generate(decoder, prompts[0][: min(8, len(prompts[0]))], 3)  # warm-up: shapes not seen yet
    runs = [generate(decoder, prompt, new_tokens) for prompt in prompts]
    decode_tokens = sum(len(run.tokens) - 1 for run in runs)
    decode_seconds = sum(run.decode_s for run in runs)
    metrics: dict[str, Any] = {
        "generation_prompts": len(prompts),
        "prompt_tokens": len(prompts[0]),
        "new_tokens": new_tokens,
        "ttft_ms": statistics.median(run.first_token_s for run in runs) * 1000,
        "decode_tokens_per_s": decode_tokens / decode_seconds if decode_seconds > 0 else None,
        "generation_peak_rss_bytes": peak_rss_bytes(),
        "generation_tokens": [run.tokens for run in runs],
    }
    metrics.update(_bandwidth_figures(metrics["decode_tokens_per_s"], decoder.weight_bytes, settings))
    scored = int(option(settings, "perplexity_tokens"))
    if stream is not None and scored > 0 and len(stream) > 1:
        window = int(option(settings, "perplexity_window"))
        if decoder.max_positions:
            window = min(window, decoder.max_positions)
        reference = settings.options.get(REFERENCE_OPTION) or {}
        scores = score_windows(decoder, stream[: scored + 1], window, reference)
        metrics.update({"window_perplexity": scores.perplexity, "perplexity_scored_tokens": scores.count,
                        "perplexity_window": window, "window_top1": scores.top1})
        if scores.kl is not None:
            metrics.update({"kl_divergence": scores.kl, "kl_top_mass": scores.top_mass,
                            "kl_top_tokens": len(reference["ids"][0])})
        elif not reference.get("ids"):  # the original: what the variants' KL needs
            metrics.update({"window_topk_ids": scores.topk_ids, "window_topk_logprobs": scores.topk_log_probs})
    return metrics


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() not in ("false", "0", "no", "off")


def _bandwidth_figures(tokens_per_s: float | None, weight_bytes: int | None,
                       settings: MeasureSettings) -> dict[str, Any]:
    from compressor.bandwidth import memory_bandwidth_gbs

    declared = settings.options.get("memory_bandwidth_gbs")
    # A variant's share is of the bound the original's process measured: one bound for all.
    inherited = (settings.options.get(REFERENCE_OPTION) or {}).get("memory_bandwidth_gbs")
    if declared:
        bandwidth, source = float(declared), "declared"
    elif inherited:
        bandwidth, source = float(inherited), "measured (copy)"
    else:
        bandwidth, source = memory_bandwidth_gbs(settings.threads), "measured (copy)"
    figures: dict[str, Any] = {"memory_bandwidth_gbs": bandwidth, "memory_bandwidth_source": source}
    from compressor.bandwidth import last_level_cache_bytes

    if weight_bytes:
        figures["decode_weight_bytes"] = weight_bytes
    cache = last_level_cache_bytes()
    if weight_bytes and weight_bytes < 2 * cache:
        # Weights that (nearly) fit in the CPU's caches are not streamed from memory each token.
        figures["bandwidth_note"] = (f"no memory-bandwidth bound: {weight_bytes / 1e6:.1f} MB of weights is under "
                                     f"twice the {cache / 1e6:.0f} MB CPU cache")
        return figures
    if weight_bytes and bandwidth > 0:
        bound = bandwidth * 1e9 / weight_bytes
        figures["decode_bound_tokens_per_s"] = bound
        if tokens_per_s:
            figures["bandwidth_share"] = tokens_per_s / bound
            if tokens_per_s > bound:
                figures["bandwidth_note"] = (
                    f"decoding read {tokens_per_s * weight_bytes / 1e9:.1f} GB/s of weights, more than the "
                    f"{bandwidth:.1f} GB/s the copy probe measured: it understated this machine's bandwidth "
                    "(another process ran while it did, or reading alone is faster than copying here); "
                    "--set memory_bandwidth_gbs= states it")
    return figures


def token_stream(data: Dataset | None, layout: KVCacheLayout | None) -> Any | None:
    """The data's token ids as one sequence: rows joined in order, padding (mask 0) left out.
    ``layout`` names the inputs (``input_ids``/``attention_mask`` without one)."""
    import numpy as np

    input_ids = layout.input_ids if layout is not None else "input_ids"
    attention_mask = layout.attention_mask if layout is not None else "attention_mask"
    if data is None or input_ids not in data.features:
        return None
    ids = np.asarray(data.features[input_ids])
    if ids.ndim == 1:
        ids = ids[None]
    ids = ids.reshape(len(ids), -1)
    mask = data.features.get(attention_mask) if attention_mask else None
    mask = np.asarray(mask).reshape(ids.shape) if mask is not None and np.size(mask) == ids.size else None
    rows = [row[mask[index] != 0] if mask is not None else row for index, row in enumerate(ids)]
    stream = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    return stream if len(stream) else None


def choose_prompts(stream: Any | None, length: int, count: int, vocabulary: int, seed: int) -> list[Any]:
    """``count`` prompts of ``length`` tokens spread over the stream (fewer, or one shorter,
    where it holds less); random tokens without a stream."""
    import numpy as np

    if stream is None:
        generator = np.random.default_rng(seed)
        return [generator.integers(0, vocabulary, length, dtype=np.int64) for _ in range(count)]
    length = min(length, len(stream))
    count = max(1, min(count, len(stream) // length))
    starts = np.linspace(0, len(stream) - length, count).astype(int)
    return [stream[start: start + length] for start in starts]


def _vocabulary(runtime: Runtime, decoder: TokenDecoder) -> int:
    layout = getattr(runtime, "kv_cache", None)
    logits_name = layout.logits if layout is not None else "logits"
    for spec in runtime.outputs:
        if spec.name == logits_name and spec.shape and isinstance(spec.shape[-1], int):
            return int(spec.shape[-1])
    import numpy as np

    return int(np.asarray(decoder.prefill(np.zeros(1, np.int64))).shape[-1])


def decoder_of(runtime: Runtime) -> TokenDecoder | None:
    """How to generate with ``runtime``: its cache layout fed back through ``run``, or its own
    :class:`TokenDecoder`; None for a runtime that cannot generate."""
    layout = getattr(runtime, "kv_cache", None)
    if layout is not None:
        return LayoutDecoder(runtime, layout)
    own = getattr(runtime, "token_decoder", None)
    return own() if callable(own) else None


class LayoutDecoder(TokenDecoder):
    """A runtime with a :class:`KVCacheLayout` as a decoder: the present fed back as the past."""

    def __init__(self, runtime: Runtime, layout: KVCacheLayout) -> None:
        self.runtime, self.layout = runtime, layout
        self.weight_bytes, self.max_positions = layout.weight_bytes, layout.max_positions
        self.past: list[Any] | None = None
        self.length = 0

    def prefill(self, ids: Any) -> Any:
        logits, self.past = _step(self.runtime, self.layout, ids[None].astype("int64"), None, 0)
        self.length = len(ids)
        return logits[0]

    def decode(self, token: int) -> Any:
        import numpy as np

        logits, self.past = _step(self.runtime, self.layout, np.array([[token]], dtype=np.int64), self.past,
                                  self.length)
        self.length += 1
        return logits[0, -1]


def _empty_past(layout: KVCacheLayout) -> list[Any]:
    import numpy as np

    shape = (1, layout.kv_heads, 0, layout.head_dim)
    return [np.zeros(shape, dtype=layout.dtype) for _ in range(2 * layout.layers)]


def _step(runtime: Runtime, layout: KVCacheLayout, tokens: Any, past: list[Any] | None,
          past_length: int) -> tuple[Any, list[Any]]:
    """One call: ``tokens [1, T]`` after ``past_length`` cached ones; the logits and the present."""
    import numpy as np

    if past is None:
        past = _empty_past(layout)
    count = tokens.shape[1]
    feeds: dict[str, Any] = {layout.input_ids: tokens}
    if layout.attention_mask:
        feeds[layout.attention_mask] = np.ones((1, past_length + count), dtype=np.int64)
    if layout.position_ids:
        feeds[layout.position_ids] = np.arange(past_length, past_length + count, dtype=np.int64)[None]
    names = [name for pair in zip(layout.past_keys, layout.past_values) for name in pair]
    feeds.update(zip(names, past))
    outputs = runtime.run(feeds)
    present = [outputs[name] for pair in zip(layout.present_keys, layout.present_values) for name in pair]
    return np.asarray(outputs[layout.logits]), present


def generate(decoder: TokenDecoder, prompt: Any, new_tokens: int) -> Generated:
    """Greedy generation of ``new_tokens`` after ``prompt`` (1-D ids), at batch 1, timed."""
    import numpy as np

    started = time.perf_counter()
    token = int(np.asarray(decoder.prefill(np.asarray(prompt, dtype=np.int64)))[-1].argmax())
    first = time.perf_counter() - started
    tokens = [token]
    started = time.perf_counter()
    while len(tokens) < new_tokens:
        token = int(np.asarray(decoder.decode(token)).argmax())
        tokens.append(token)
    return Generated(tokens, first, time.perf_counter() - started)


@dataclass
class WindowScores:
    """The sliding-window scoring of the data: perplexity, the top-1 of every scored token and,
    against the original's top tokens, the mean KL divergence (:mod:`compressor.token_divergence`)."""

    perplexity: float
    top1: list[int]
    count: int
    topk_ids: list[list[int]]
    topk_log_probs: list[list[float]]
    kl: float | None = None
    top_mass: float | None = None


def window_perplexity(decoder: TokenDecoder, stream: Any, window: int) -> tuple[float, list[int], int]:
    """Perplexity of ``stream[1:]`` given what precedes each token, in windows of ``window``
    tokens moving by half a window; also the top-1 prediction of every scored token."""
    scores = score_windows(decoder, stream, window)
    return scores.perplexity, scores.top1, scores.count


def score_windows(decoder: TokenDecoder, stream: Any, window: int,
                  reference: Mapping[str, Any] | None = None) -> WindowScores:
    """:func:`window_perplexity` with every scored position's top tokens, or, given the
    original's (``reference["ids"]``/``["log_probs"]``, one row per scored token), the KL
    divergence from them."""
    import numpy as np

    from compressor.token_divergence import divergences, log_probabilities, top_tokens

    stride = max(1, window // 2)
    total_nll, top1 = 0.0, []
    topk_ids: list[list[int]] = []
    topk_log_probs: list[list[float]] = []
    kls, masses = [], []
    reference_ids = (reference or {}).get("ids")
    previous_end = 1  # the first token has nothing to be predicted from
    for begin in range(0, len(stream), stride):
        end = min(begin + window, len(stream))
        if end <= previous_end:
            break
        logits = np.asarray(decoder.prefill(stream[begin:end]))
        # logits at position j predict token j + 1: score the targets not scored yet.
        log_probs = log_probabilities(logits[previous_end - 1 - begin: end - 1 - begin])
        targets = stream[previous_end:end]
        total_nll -= float(log_probs[np.arange(len(targets)), targets].sum())
        scored = len(top1)
        top1.extend(int(value) for value in log_probs.argmax(axis=-1))
        if reference_ids is None:
            ids, values = top_tokens(log_probs)
            topk_ids += ids
            topk_log_probs += values
        elif len(reference_ids) >= len(top1):
            kl, mass = divergences(reference_ids[scored:len(top1)],
                                   reference["log_probs"][scored:len(top1)], log_probs)  # type: ignore[index]
            kls.append(kl)
            masses.append(mass)
        previous_end = end
    count = len(top1)
    scores = WindowScores(float(np.exp(total_nll / count)), top1, count, topk_ids, topk_log_probs)
    if reference_ids is not None and len(reference_ids) == count and kls:
        scores.kl = float(np.concatenate(kls).mean())
        scores.top_mass = float(np.concatenate(masses).mean())
    return scores


def compare_generation(reference: Mapping[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    """The variant's generation against the original's; removes the raw tokens from ``variant``."""
    raw = {key: variant.pop(key) for key in RAW_KEYS if key in variant}
    compared: dict[str, Any] = {}
    ours, theirs = raw.get("generation_tokens"), reference.get("generation_tokens")
    if ours and theirs and len(ours) == len(theirs):
        prefixes = [_common_prefix(mine, original) / max(1, len(original)) for mine, original in zip(ours, theirs)]
        compared["greedy_agreement"] = statistics.fmean(prefixes)
        compared["greedy_exact"] = statistics.fmean(float(list(a) == list(b)) for a, b in zip(ours, theirs))
    ours, theirs = raw.get("window_top1"), reference.get("window_top1")
    if ours and theirs and len(ours) == len(theirs):
        compared["next_token_agreement"] = statistics.fmean(float(a == b) for a, b in zip(ours, theirs))
    if isinstance(reference.get("window_perplexity"), float):
        compared["window_perplexity_original"] = reference["window_perplexity"]
    return compared


def _common_prefix(first: list[int], second: list[int]) -> int:
    for index, (a, b) in enumerate(zip(first, second)):
        if a != b:
            return index
    return min(len(first), len(second))
