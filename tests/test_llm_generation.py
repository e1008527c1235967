"""Causal language models exported with a key/value cache and measured generating (issue 27).

Tiny GPT-2 and Llama (rotary positions, grouped-query attention) built in-test with random
weights: the cached graph computes what the model computes, decoding with the cache gives
what recomputing the prefix gives, and ``compressor run`` reports generation figures.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from compressor.cli import cli
from compressor.feeding import examples_from_data
from compressor.generation import compare_generation, decoder_of, generate, window_perplexity
from compressor.kv_layout import KVCacheLayout, TokenDecoder
from compressor.models import Artifact, Context, Dataset, MeasureSettings
from compressor.runtime import Runtime

VOCABULARY = 300


def tiny_causal_lm(folder: Path, kind: str) -> Path:
    """A transformers folder of a two-layer GPT-2 or Llama with random weights, and token data."""
    import torch
    import transformers

    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCABULARY, n_positions=128,
                                         bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          hidden_size=32, intermediate_size=64, vocab_size=VOCABULARY,
                                          max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
        model = transformers.LlamaForCausalLM(config)
    model.eval().save_pretrained(folder, safe_serialization=True)
    ids = np.random.default_rng(0).integers(0, VOCABULARY, size=(12, 24)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[6:, 18:] = 0
    np.savez(folder.parent / "ids.npz", input_ids=ids, attention_mask=mask)
    return folder


def session(graph: Any) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])


def cache_feeds(layers: int, kv_heads: int, head_dim: int, ids: Any, past: list[Any] | None,
                with_positions: bool) -> dict[str, Any]:
    past_length = past[0].shape[2] if past else 0
    past = past or [np.zeros((len(ids), kv_heads, 0, head_dim), np.float32)] * (2 * layers)
    feeds = {"input_ids": ids, "attention_mask": np.ones((len(ids), past_length + ids.shape[1]), np.int64)}
    if with_positions:
        feeds["position_ids"] = np.broadcast_to(np.arange(past_length, past_length + ids.shape[1]), ids.shape)
    for layer in range(layers):
        feeds[f"past_key_values.{layer}.key"] = past[2 * layer]
        feeds[f"past_key_values.{layer}.value"] = past[2 * layer + 1]
    return feeds


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_the_cached_graph_prefills_like_the_uncached_one_and_decodes_like_recomputing(
        tmp_path: Path, kind: str) -> None:
    from compressor_frontends.pytorch.export import export_onnx
    from compressor_frontends.pytorch.hf import load_transformers
    from compressor_frontends.pytorch.kv_export import export_with_cache, probe_cache

    folder = tiny_causal_lm(tmp_path / kind, kind)
    model, _ = load_transformers(folder, ())
    shape = probe_cache(model.module)
    assert (shape.layers, shape.kv_heads, shape.head_dim) == ((2, 2, 16) if kind == "gpt2" else (2, 2, 8))
    tokens = np.load(tmp_path / "ids.npz")
    data = Dataset(tmp_path / "ids.npz", {name: tokens[name] for name in ("input_ids", "attention_mask")}, None, 12)
    context = Context(workdir=tmp_path, eval_data=data)
    cached, path = export_with_cache(model, context)
    plain, _ = export_onnx(model, context)  # as without a cache: the inputs the data has
    assert path is None and [value.name for value in cached.graph.output][:3] == ["logits", "present.0.key",
                                                                                  "present.0.value"]
    with_cache, without = session(cached), session(plain)
    positions = "position_ids" in {node.name for node in with_cache.get_inputs()}
    ids = np.random.default_rng(1).integers(0, VOCABULARY, size=(2, 12)).astype(np.int64)
    full = with_cache.run(None, cache_feeds(2, shape.kv_heads, shape.head_dim, ids, None, positions))
    reference = without.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    assert full[0].shape == (2, 12, VOCABULARY) and np.abs(full[0] - reference).max() < 1e-4
    assert full[1].shape == (2, shape.kv_heads, 12, shape.head_dim)
    # Prefill 8 tokens, then decode 4 one at a time: each step's logits are the full pass's.
    outputs = with_cache.run(None, cache_feeds(2, shape.kv_heads, shape.head_dim, ids[:, :8], None, positions))
    past = outputs[1:]
    for step in range(8, 12):
        outputs = with_cache.run(None, cache_feeds(2, shape.kv_heads, shape.head_dim, ids[:, step:step + 1],
                                                   past, positions))
        past = outputs[1:]
        assert np.abs(outputs[0][:, -1] - full[0][:, step]).max() < 1e-4
    assert past[0].shape[2] == 12


class BigramRuntime(Runtime):
    """A runtime in NumPy whose next token depends on the last one only (a known perplexity),
    with a key/value cache of one head that holds the token ids it saw."""

    def __init__(self, log_probs: Any) -> None:
        self.log_probs = log_probs
        self.kv_cache = KVCacheLayout(past_keys=("past.key",), past_values=("past.value",),
                                      present_keys=("present.key",), present_values=("present.value",),
                                      kv_heads=1, head_dim=1, position_ids="position_ids", weight_bytes=10**10)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        ids = feeds["input_ids"]
        assert feeds["attention_mask"].shape[1] == feeds["past.key"].shape[2] + ids.shape[1]
        assert feeds["position_ids"][0, 0] == feeds["past.key"].shape[2]
        seen = np.concatenate([feeds["past.key"], ids[:, None, :, None].astype(np.float32)], axis=2)
        return {"logits": self.log_probs[ids], "present.key": seen, "present.value": seen}


def test_perplexity_and_greedy_generation_follow_the_model_exactly() -> None:
    generator = np.random.default_rng(0)
    table = generator.normal(size=(20, 20))
    log_probs = table - np.log(np.exp(table).sum(axis=1, keepdims=True))
    runtime = BigramRuntime(log_probs)
    stream = generator.integers(0, 20, 101)
    expected = math.exp(-float(np.mean(log_probs[stream[:-1], stream[1:]])))
    for window in (8, 16, 101, 400):
        perplexity, top1, scored = window_perplexity(decoder_of(runtime), stream, window)
        assert scored == 100 and perplexity == pytest.approx(expected, rel=1e-9)
        assert top1 == [int(log_probs[token].argmax()) for token in stream[:-1]]
    done = generate(decoder_of(runtime), stream[:5], 6)
    expected_tokens, token = [], int(stream[4])
    for _ in range(6):
        token = int(log_probs[token].argmax())
        expected_tokens.append(token)
    assert done.tokens == expected_tokens and done.first_token_s > 0 and done.decode_s > 0
    original = {"generation_tokens": [[1, 2, 3, 4], [5, 6, 7, 8]], "window_top1": [1, 2, 3, 4],
                "window_perplexity": 3.0}
    variant = {"generation_tokens": [[1, 2, 9, 4], [5, 6, 7, 8]], "window_top1": [1, 2, 3, 0]}
    compared = compare_generation(original, variant)
    assert compared == {"greedy_agreement": (0.5 + 1.0) / 2, "greedy_exact": 0.5, "next_token_agreement": 0.75,
                        "window_perplexity_original": 3.0}
    assert variant == {}


def test_the_kl_divergence_on_the_data_is_the_exact_one_or_a_lower_bound_of_it() -> None:
    from compressor.generation import score_windows
    from compressor.token_divergence import top_tokens

    generator = np.random.default_rng(3)
    table = generator.normal(size=(20, 20))
    original = table - np.log(np.exp(table).sum(axis=1, keepdims=True))
    moved = table + generator.normal(scale=0.3, size=table.shape)
    variant = moved - np.log(np.exp(moved).sum(axis=1, keepdims=True))
    stream = generator.integers(0, 20, 101)
    full = np.exp(original[stream[:-1]]) * (original[stream[:-1]] - variant[stream[:-1]])
    exact = float(full.sum(axis=1).mean())
    reference = score_windows(decoder_of(BigramRuntime(original)), stream, 16)
    assert len(reference.topk_ids) == 100 and len(reference.topk_ids[0]) == 20  # every token of 20
    assert reference.kl is None
    scores = score_windows(decoder_of(BigramRuntime(variant)), stream, 16,
                           {"ids": reference.topk_ids, "log_probs": reference.topk_log_probs})
    assert scores.kl == pytest.approx(exact, rel=1e-5) and scores.top_mass == pytest.approx(1.0)
    assert scores.topk_ids == []
    # Five tokens and the rest merged: never above the full KL, and not nothing.
    ids, values = top_tokens(original[stream[:-1]], 5)
    merged = score_windows(decoder_of(BigramRuntime(variant)), stream, 16, {"ids": ids, "log_probs": values})
    assert 0.2 * exact < merged.kl <= exact and merged.top_mass < 0.95
    itself = score_windows(decoder_of(BigramRuntime(original)), stream, 16, {"ids": ids, "log_probs": values})
    assert itself.kl == pytest.approx(0.0, abs=1e-6)


class BigramDecoder(TokenDecoder):
    """The same bigram model as a runtime keeping its own cache (as llama.cpp does)."""

    def __init__(self, log_probs: Any) -> None:
        self.log_probs, self.weight_bytes, self.seen, self.decoded = log_probs, 10**10, [], 0

    def prefill(self, ids: Any) -> Any:
        self.seen = list(ids)
        return self.log_probs[np.asarray(ids)]

    def decode(self, token: int) -> Any:
        self.seen.append(token)
        self.decoded += 1
        return self.log_probs[token]


class OwnCacheRuntime(Runtime):
    outputs = ()

    def __init__(self, log_probs: Any) -> None:
        self.decoder = BigramDecoder(log_probs)

    def token_decoder(self) -> TokenDecoder:
        return self.decoder


def test_a_runtime_with_its_own_cache_is_measured_like_one_with_a_layout() -> None:
    from compressor.generation import measure_generation

    generator = np.random.default_rng(1)
    table = generator.normal(size=(20, 20))
    log_probs = table - np.log(np.exp(table).sum(axis=1, keepdims=True))
    data = Dataset(Path("ids.npz"), {"input_ids": generator.integers(0, 20, (4, 60))}, None, 4)
    settings = MeasureSettings(options={"memory_bandwidth_gbs": 10.0, "perplexity_window": 16,
                                        "prompt_tokens": 20, "new_tokens": 8})
    by_layout = measure_generation(BigramRuntime(log_probs), data, settings)
    own = OwnCacheRuntime(log_probs)
    by_decoder = measure_generation(own, data, settings)
    for key in ("generation_tokens", "window_top1", "window_perplexity", "prompt_tokens", "new_tokens",
                "decode_bound_tokens_per_s"):
        assert by_decoder[key] == by_layout[key], key
    assert by_decoder["decode_tokens_per_s"] > 0 and by_decoder["bandwidth_share"] > 0
    # 10 GB of weights at 10 GB/s: one token a second at the most.
    assert by_decoder["decode_bound_tokens_per_s"] == pytest.approx(1.0)
    # decoded token by token: every token after each prompt's first (warm-up: 2 more)
    assert own.decoder.decoded == 2 + sum(len(tokens) - 1 for tokens in by_decoder["generation_tokens"])


def test_the_onnx_runtime_feeds_tokens_alone_and_describes_its_cache(tmp_path: Path) -> None:
    import onnx

    from compressor_frontends.pytorch.hf import load_transformers
    from compressor_frontends.pytorch.kv_export import export_with_cache
    from compressor_onnx.runtime import OnnxRuntime

    folder = tiny_causal_lm(tmp_path / "llama", "llama")
    model, _ = load_transformers(folder, ())
    graph, _ = export_with_cache(model, Context(workdir=tmp_path))
    onnx.save_model(graph, str(tmp_path / "model.onnx"))
    runtime = OnnxRuntime(Artifact("onnx", tmp_path / "model.onnx", "onnx"), MeasureSettings())
    layout = runtime.kv_cache
    assert layout is not None and (layout.layers, layout.kv_heads, layout.head_dim) == (2, 2, 8)
    assert layout.position_ids == "position_ids" and layout.max_positions == 128
    # Every weight but the embedding table, which Gather reads one row of per token.
    assert 0 < layout.weight_bytes <= (tmp_path / "model.onnx").stat().st_size - VOCABULARY * 32 * 4
    assert [spec.name for spec in runtime.inputs] == ["input_ids", "attention_mask"]
    assert runtime.inputs[1].optional and [spec.name for spec in runtime.outputs] == ["logits"]
    ids = np.random.default_rng(2).integers(0, VOCABULARY, size=(1, 10)).astype(np.int64)
    examples = examples_from_data(Dataset(tmp_path / "ids.npz", {"input_ids": ids}, None, 1), runtime.inputs, {})
    assert list(examples.arrays) == ["input_ids"]  # the mask is optional: data may leave it out
    alone = runtime.run(examples.take(0, 1))["logits"]
    explicit = runtime.run(cache_feeds(2, 2, 8, ids, None, True))["logits"]
    assert np.array_equal(alone, explicit)
    # Left padding: positions follow the mask, so the padded row's logits are the unpadded row's.
    padded = np.concatenate([np.zeros((1, 3), np.int64), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 3), np.int64), np.ones((1, 10), np.int64)], axis=1)
    shifted = runtime.run({"input_ids": padded, "attention_mask": mask})["logits"][:, 3:]
    assert np.abs(shifted - alone).max() < 1e-4


def test_a_cached_onnx_file_of_its_own_takes_token_data_and_is_measured_generating(tmp_path: Path) -> None:
    """An exported graph with a cache, given as a file (compressor's output, Optimum's): the
    data holds token ids, not the cache, and every variant is measured generating."""
    import onnx

    from compressor_frontends.pytorch.hf import load_transformers
    from compressor_frontends.pytorch.kv_export import export_with_cache

    folder = tiny_causal_lm(tmp_path / "llama", "llama")
    model, _ = load_transformers(folder, ())
    graph, _ = export_with_cache(model, Context(workdir=tmp_path))
    onnx.save_model(graph, str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "tokens.npz", input_ids=np.load(tmp_path / "ids.npz")["input_ids"][:6])
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [str(arg) for arg in (
        "run", tmp_path / "model.onnx", "-q", "int4", "--data", tmp_path / "tokens.npz", "--min-seconds", "0",
        "--set", "prompt_tokens=16", "--set", "new_tokens=8", "-o", out)])
    assert result.exit_code == 0, result.output
    variants = {variant["name"]: variant["metrics"] for variant in
                json.loads((out / "report.json").read_text())["variants"]}
    assert set(variants) == {"original", "int4"}
    for metrics in variants.values():
        assert metrics["new_tokens"] == 8 and 0 < metrics["decode_tokens_per_s"] < 1e6
        assert math.isfinite(metrics["window_perplexity"])
    assert 0 <= variants["int4"]["greedy_agreement"] <= 1 and variants["int4"]["kl_divergence"] > 0


def test_a_run_reports_generation_figures_for_every_variant(tmp_path: Path) -> None:
    import onnx

    folder = tiny_causal_lm(tmp_path / "gpt2", "gpt2")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [str(arg) for arg in (
        "run", folder, "-q", "dynamic", "-q", "int4", "-q", "int8", "--data", tmp_path / "ids.npz",
        "--calibration-data", tmp_path / "ids.npz", "--min-seconds", "0",
        "--set", "prompt_tokens=16", "--set", "new_tokens=8", "--set", "perplexity_window=32", "-o", out)])
    assert result.exit_code == 0, result.output
    names = [value.name for value in onnx.load(str(out / "int4.onnx"), load_external_data=False).graph.input]
    assert names[:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    variants = {variant["name"]: variant["metrics"] for variant in
                json.loads((out / "report.json").read_text())["variants"]}
    # Static int8 calibrates on prefills of the data's tokens (an empty past fed per example).
    original, dynamic, int4, int8 = variants["original"], variants["dynamic"], variants["int4"], variants["int8"]
    for metrics in (original, dynamic, int4, int8):
        assert metrics["prompt_tokens"] == 16 and metrics["new_tokens"] == 8 and metrics["generation_prompts"] == 4
        assert 0 < metrics["ttft_ms"] < 10_000 and 0 < metrics["decode_tokens_per_s"] < 1e6
        # A tiny model's weights sit in the CPU's cache: no memory bound is claimed for them.
        assert metrics["memory_bandwidth_gbs"] > 0.5 and "bandwidth_share" not in metrics
        assert "CPU cache" in metrics["bandwidth_note"]
        assert math.isfinite(metrics["window_perplexity"]) and metrics["window_perplexity"] > 1
        assert metrics["perplexity_scored_tokens"] == 6 * 24 + 6 * 18 - 1
        assert "generation_tokens" not in metrics and "window_top1" not in metrics
        assert metrics["window_perplexity_original"] == original["window_perplexity"]
    assert original["greedy_agreement"] == original["greedy_exact"] == original["next_token_agreement"] == 1.0
    for metrics in (dynamic, int4, int8):
        assert 0 <= metrics["greedy_exact"] <= metrics["greedy_agreement"] <= 1
        assert 0.5 < metrics["next_token_agreement"] <= 1
        # KL from the original's distribution: a vocabulary of 300, its top 64 tokens and the rest.
        assert 0 < metrics["kl_divergence"] < 0.5 and metrics["kl_top_tokens"] == 64
        assert 0.2 < metrics["kl_top_mass"] <= 1 and "window_topk_ids" not in metrics
        # One bandwidth bound for every variant: the one the original's process measured.
        assert metrics["memory_bandwidth_gbs"] == original["memory_bandwidth_gbs"]
    assert "kl_divergence" not in original and "window_topk_logprobs" not in original
    # int4 moves the distribution further than int8 does.
    assert int4["kl_divergence"] > dynamic["kl_divergence"]
    # Weight-only int4 reads fewer bytes per token than fp32.
    assert int4["decode_weight_bytes"] < original["decode_weight_bytes"] / 3
    # The printed table and report.md show each variant's generation.
    table = result.output[result.output.index("generation (batch 1, 16-token prompts, 8 new tokens"):]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[3:7]}
    assert set(rows) == {"original", "dynamic", "int4", "int8"}, table
    speed = int4["decode_tokens_per_s"]
    assert rows["int4"][2] == (f"{speed:.3g}" if speed < 100 else f"{speed:.0f}")
    assert rows["original"][4:6] == ["1.00", "1.00"] and "| decode tok/s |" in (out / "report.md").read_text()


class OneShotRuntime(Runtime):
    """A runtime with neither a cache layout nor a decoder of its own: it cannot generate."""

    outputs = ()

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        return {}


def test_task_generate_measures_generation_and_is_refused_where_nothing_can_generate(
        tmp_path: Path, toy_host: object, toy_model: dict[str, Path]) -> None:
    from compressor.errors import UnsupportedError
    from compressor.generation import measure_generation

    generator = np.random.default_rng(4)
    table = generator.normal(size=(20, 20))
    log_probs = table - np.log(np.exp(table).sum(axis=1, keepdims=True))
    data = Dataset(Path("ids.npz"), {"input_ids": generator.integers(0, 20, (2, 40))}, None, 2)
    off = {"generate": False, "memory_bandwidth_gbs": 10.0, "prompt_tokens": 8, "new_tokens": 4,
           "perplexity_tokens": 0}
    assert measure_generation(BigramRuntime(log_probs), data, MeasureSettings(options=off)) == {}
    forced = measure_generation(BigramRuntime(log_probs), data, MeasureSettings(options={**off, "task": "generate"}))
    assert forced["new_tokens"] == 4 and forced["decode_tokens_per_s"] > 0
    with pytest.raises(UnsupportedError, match="task=generate"):
        measure_generation(OneShotRuntime(), data, MeasureSettings(options={"task": "generate"}))
    out = tmp_path / "out"
    refused = CliRunner().invoke(cli, ["run", str(toy_model["model"]), "-q", "fp16", "--data", str(toy_model["eval"]),
                                       "--set", "task=generate", "-o", str(out)])
    assert refused.exit_code == 5, refused.output
    assert "task=generate" in refused.output and "Traceback" not in refused.output and not out.exists()


def test_a_sequence_runtime_opens_a_power_of_two_context_within_the_models() -> None:
    from compressor.plugin import MIN_CONTEXT, SequenceRuntime

    assert SequenceRuntime.context_for(1) == SequenceRuntime.context_for(MIN_CONTEXT) == MIN_CONTEXT
    assert SequenceRuntime.context_for(MIN_CONTEXT + 1) == 2 * MIN_CONTEXT
    assert SequenceRuntime.context_for(300, 400) == 400 and SequenceRuntime.context_for(5000) == 8192


def test_a_decode_past_the_bound_says_the_probe_understated_the_bandwidth() -> None:
    """A share over 100% is not a physical figure: the report says the probe ran low."""
    from compressor.generation import _bandwidth_figures
    from compressor.models import MeasureSettings

    settings = MeasureSettings(options={"memory_bandwidth_gbs": 20.0})
    within = _bandwidth_figures(15.0, 1_000_000_000, settings)
    assert within["bandwidth_share"] == pytest.approx(0.75) and "bandwidth_note" not in within
    past = _bandwidth_figures(25.0, 1_000_000_000, settings)
    assert past["bandwidth_share"] == pytest.approx(1.25)
    assert "read 25.0 GB/s of weights, more than the 20.0 GB/s" in past["bandwidth_note"]
