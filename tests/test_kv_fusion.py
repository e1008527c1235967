"""ONNX Runtime's fused attention in the generation-ready export (issue 27).

A tiny Llama (rotary positions, grouped-query attention) built in-test: the backend's export
rewrites its attention into GroupQueryAttention + RotaryEmbedding, its residual adds + RMSNorms
into SkipSimplifiedLayerNormalization, each layer's Q/K/V projections into one MatMul, and
the attention bias into the padding alone; the fused graph computes what the unfused one does
(prefill with left padding, decode, chunked prefill), every quantization mode works on it,
and a model the pass does not know is left as exported.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compressor.models import Context, Dataset, Step

VOCABULARY, LAYERS, KV_HEADS, HEAD_DIM = 300, 2, 2, 8


def tiny_llama(folder: Path, **config: Any) -> Any:
    import torch
    import transformers

    from compressor_frontends.pytorch.hf import load_transformers

    torch.manual_seed(0)
    settings = dict(num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=KV_HEADS, hidden_size=32,
                    intermediate_size=64, vocab_size=VOCABULARY, max_position_embeddings=128, bos_token_id=0,
                    eos_token_id=0)
    module = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**settings, **config}))
    module.eval().save_pretrained(folder, safe_serialization=True)
    model, _ = load_transformers(folder, ())
    return model


def session(graph: Any) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])


def run(graph_session: Any, ids: Any, mask: Any, past: list[Any] | None) -> list[Any]:
    batch = ids.shape[0]
    past = past or [np.zeros((batch, KV_HEADS, 0, HEAD_DIM), np.float32)] * (2 * LAYERS)
    feeds = {"input_ids": ids, "attention_mask": mask,
             "position_ids": np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -ids.shape[1]:]}
    feeds.update({f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": tensor for i, tensor in enumerate(past)})
    return graph_session.run(None, feeds)


def op_types(graph: Any) -> Counter:
    return Counter(node.op_type for node in graph.graph.node)


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny Llama exported by the backend (fused) and without the pass (unfused)."""
    from compressor_frontends.pytorch.kv_export import export_with_cache
    from compressor_onnx.export import export_graph

    folder = tmp_path_factory.mktemp("llama")
    model = tiny_llama(folder / "model")
    context = Context(workdir=folder)
    fused, _ = export_graph(model, context)
    plain, _ = export_with_cache(model, context)
    return {"fused": fused, "plain": plain, "model": model, "folder": folder}


def test_the_export_uses_fused_attention_and_computes_what_the_unfused_graph_does(exports: dict[str, Any]) -> None:
    from compressor_onnx.kv_fusion import FUSED_KEY, FUSED_OPS
    from compressor_onnx.kv_fusion_export import NORMS_KEY, PACKED_KEY, PADDING_KEY

    fused, plain = exports["fused"], exports["plain"]
    ops = op_types(fused)
    assert set(FUSED_OPS) <= set(ops) and not set(FUSED_OPS) & set(op_types(plain))
    # Every layer's attention is one GroupQueryAttention, the rotation two RotaryEmbedding.
    assert ops["GroupQueryAttention"] == LAYERS and ops["RotaryEmbedding"] == 2 * LAYERS
    assert "Softmax" not in ops
    # Every norm but the first layer's (left to ONNX Runtime) takes its residual add; one MatMul
    # makes Q, K and V (split for the rotary embeddings); the exporter's mask nodes are gone.
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * LAYERS and ops["Pow"] == 1
    assert ops["Split"] == LAYERS and ops["MatMul"] == 5 * LAYERS + 1
    assert "Range" not in ops and ops["Where"] == 1
    assert sum(ops.values()) < sum(op_types(plain).values()) / 4
    metadata = {entry.key: entry.value for entry in fused.metadata_props}
    assert metadata[FUSED_KEY] == str(LAYERS) and metadata[NORMS_KEY] == str(2 * LAYERS)
    assert metadata[PACKED_KEY] == str(LAYERS) and metadata[PADDING_KEY] == "1"
    assert [value.name for value in fused.graph.input] == [value.name for value in plain.graph.input]
    assert [value.name for value in fused.graph.output] == [value.name for value in plain.graph.output]
    assert_computes_the_same(fused, plain)


def assert_computes_the_same(fused: Any, plain: Any) -> None:
    """A left-padded batch of two, prefilled then decoded, and one row's chunked prefill: the
    fused graph's logits and cache at every real position are the unfused graph's."""
    with_fusion, without = session(fused), session(plain)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCABULARY, size=(2, 12))
    mask = np.ones((2, 12), np.int64)
    mask[1, :3] = 0  # left padding: positions and the mask say where row 1 starts
    full_fused, full_plain = run(with_fusion, ids, mask, None), run(without, ids, mask, None)
    assert np.abs(full_fused[0][0] - full_plain[0][0]).max() < 1e-4
    assert np.abs(full_fused[0][1, 3:] - full_plain[0][1, 3:]).max() < 1e-4
    # Prefill 8 tokens, then decode 4 one at a time: each step's logits are the full pass's.
    outputs = run(with_fusion, ids[:, :8], mask[:, :8], None)
    for step in range(8, 12):
        outputs = run(with_fusion, ids[:, step:step + 1], mask[:, :step + 1], outputs[1:])
        assert np.abs(outputs[0][:, -1] - full_plain[0][:, step]).max() < 1e-4
    assert np.abs(outputs[1][:, :, 3:] - full_plain[1][:, :, 3:]).max() < 1e-4
    # One row: a prefill of 5, then 4 tokens at once (chunked prefill), then 3 decode steps.
    row = ids[:1]
    outputs = run(with_fusion, row[:, :5], mask[:1, :5], None)
    outputs = run(with_fusion, row[:, 5:9], mask[:1, :9], outputs[1:])
    assert np.abs(outputs[0] - full_plain[0][:1, 5:9]).max() < 1e-4
    for step in range(9, 12):
        outputs = run(with_fusion, row[:, step:step + 1], mask[:1, :step + 1], outputs[1:])
        assert np.abs(outputs[0][:, -1] - full_plain[0][0, step]).max() < 1e-4


@pytest.mark.parametrize("mode", ["dynamic", "int4", "int4-gptq", "int4-awq", "int8", "fp16"])
def test_every_quantization_mode_works_on_the_fused_graph(exports: dict[str, Any], mode: str) -> None:
    from compressor_onnx.quantization import quantize_graph

    rng = np.random.default_rng(2)
    ids = rng.integers(0, VOCABULARY, size=(6, 16))
    data = Dataset(Path("ids.npz"), {"input_ids": ids}, None, 6)
    context = Context(workdir=exports["folder"], calibration_data=data, eval_data=data)
    params = {"mode": mode.split("-")[0], **({"algorithm": mode.split("-")[1]} if "-" in mode else {})}
    quantized, notes, _ = quantize_graph(exports["fused"], Step("quantize", params), context, exports["folder"])
    ops = op_types(quantized)
    assert ops["GroupQueryAttention"] == LAYERS and ops["RotaryEmbedding"] == 2 * LAYERS
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * LAYERS and ops["Split"] == LAYERS
    quantized_ops = {"dynamic": "MatMulInteger", "int4": "MatMulNBits", "int4-gptq": "MatMulNBits",
                     "int4-awq": "MatMulNBits", "int8": "QuantizeLinear", "fp16": "Cast"}[mode]
    assert ops[quantized_ops] > 0, ops
    if mode.startswith("int4"):  # one MatMulNBits makes a layer's Q, K and V
        assert ops["MatMulNBits"] == 5 * LAYERS + 1
    if mode == "int4-awq":  # a fused norm takes the scale of what reads it (through its typing Cast)
        producers = {output: node for node in quantized.graph.node for output in node.output}
        scaled = [node for node in quantized.graph.node if node.op_type == "SkipSimplifiedLayerNormalization"
                  and "_awq" in node.input[2]]
        inserted = [node for node in quantized.graph.node if node.name.endswith("_awq_Mul")]
        assert scaled and "folded into their producer" in notes[0], notes
        assert not any(producers[node.input[0]].name.startswith("/compressor/fused/norm.") for node in inserted)
    mask = np.ones((1, 10), np.int64)
    reference = run(session(exports["fused"]), ids[:1, :10], mask, None)[0]
    prefill = run(session(quantized), ids[:1, :9], mask[:, :9], None)
    step = run(session(quantized), ids[:1, 9:10], mask, prefill[1:])
    assert step[0].shape == (1, 1, VOCABULARY) and np.isfinite(step[0]).all()
    # Close to float32 (random weights: small logits), and decoding with the cache as in one pass.
    assert np.abs(step[0][0, -1] - reference[0, 9]).max() < 0.25
    full = run(session(quantized), ids[:1, :10], mask, None)[0]
    assert np.abs(step[0][0, -1] - full[0, 9]).max() < (1e-4 if mode in ("int4", "int4-gptq") else 0.05)


def test_gpt2_without_rotary_positions_is_fused_and_decodes_as_before(tmp_path: Path) -> None:
    import torch
    import transformers

    from compressor_frontends.pytorch.hf import load_transformers
    from compressor_frontends.pytorch.kv_export import export_with_cache
    from compressor_onnx.export import export_graph

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCABULARY, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    model, _ = load_transformers(tmp_path / "gpt2", ())
    fused, _ = export_graph(model, Context(workdir=tmp_path))
    plain, _ = export_with_cache(model, Context(workdir=tmp_path))
    ops = op_types(fused)
    assert ops["GroupQueryAttention"] == 2 and "RotaryEmbedding" not in ops and "Softmax" not in ops
    ids = np.random.default_rng(5).integers(0, VOCABULARY, size=(1, 10))
    mask = np.ones((1, 10), np.int64)
    past = [np.zeros((1, 2, 0, 16), np.float32)] * 4

    def feeds(count: int, begin: int, cache: list[Any]) -> dict[str, Any]:
        names = [f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}" for i in range(4)]
        return {"input_ids": ids[:, begin:begin + count], "attention_mask": mask[:, :begin + count],
                "position_ids": np.arange(begin, begin + count)[None], **dict(zip(names, cache))}

    full = session(plain).run(None, feeds(10, 0, past))[0]
    with_fusion = session(fused)
    outputs = with_fusion.run(None, feeds(6, 0, past))
    for step in range(6, 10):
        outputs = with_fusion.run(None, feeds(1, step, outputs[1:]))
        assert np.abs(outputs[0][0, -1] - full[0, step]).max() < 1e-4


def test_a_model_the_pass_does_not_know_is_exported_unfused(tmp_path: Path) -> None:
    from compressor_onnx.export import export_graph

    # A sliding-window cache keeps only the window: the pass would change what present holds.
    graph, _ = export_graph(_mistral(tmp_path / "mistral"), Context(workdir=tmp_path))
    assert "GroupQueryAttention" not in op_types(graph) and "Softmax" in op_types(graph)
    assert not list(tmp_path.glob("fusion-check-*"))  # the miniature's files are gone


def _mistral(folder: Path) -> Any:
    import torch
    import transformers

    from compressor_frontends.pytorch.hf import load_transformers

    torch.manual_seed(0)
    config = transformers.MistralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        hidden_size=32, intermediate_size=64, vocab_size=VOCABULARY,
                                        max_position_embeddings=128, sliding_window=4)
    transformers.MistralForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)
    model, _ = load_transformers(folder, ())
    return model


def test_a_token_streams_the_weights_but_not_the_tables_it_reads_a_row_of(exports: dict[str, Any]) -> None:
    import onnx

    from compressor_onnx.kv_runtime import _streamed_weight_bytes
    from compressor_onnx.quantization import quantize_graph

    folder = exports["folder"]
    paths = {}
    int4, _, _ = quantize_graph(exports["fused"], Step("quantize", {"mode": "int4"}), Context(workdir=folder), folder)
    for name, graph in (("plain", exports["plain"]), ("fused", exports["fused"]), ("int4", int4)):
        paths[name] = folder / f"{name}.onnx"
        onnx.save_model(graph, str(paths[name]))
    # The rotary tables (128 positions) are read a row per position, like the embedding table.
    assert _streamed_weight_bytes(str(paths["fused"])) == _streamed_weight_bytes(str(paths["plain"]))
    module = exports["model"].module
    embedding = module.model.embed_tokens.weight.numel() * 4
    parameters = sum(parameter.numel() for parameter in module.parameters()) * 4
    assert _streamed_weight_bytes(str(paths["plain"])) <= parameters - embedding
    # int4 gathers its embedding rows from a block-quantized table: not streamed either.
    assert "GatherBlockQuantized" in op_types(int4)
    int4_bytes = _streamed_weight_bytes(str(paths["int4"]))
    lm_head = module.lm_head.weight.numel()
    assert lm_head // 2 < int4_bytes < (parameters - embedding) / 4


def test_a_large_export_is_fused_on_disk(
        exports: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    from compressor_frontends.pytorch.export import LARGE_MODEL_VARIABLE
    from compressor_onnx.export import export_graph

    monkeypatch.setenv(LARGE_MODEL_VARIABLE, "2000")
    graph, path = export_graph(exports["model"], Context(workdir=tmp_path))
    assert graph is None and path is not None
    on_disk = onnx.load(str(path), load_external_data=False)
    assert op_types(on_disk)["GroupQueryAttention"] == LAYERS
    import onnxruntime as ort

    rng = np.random.default_rng(6)
    ids, mask = rng.integers(0, VOCABULARY, size=(1, 6)), np.ones((1, 6), np.int64)
    from_disk = run(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), ids, mask, None)
    in_memory = run(session(exports["fused"]), ids, mask, None)
    assert all(np.array_equal(first, second) for first, second in zip(from_disk, in_memory))
    # The large-model quantizers (file to file) keep the fused ops and run.
    from compressor_onnx.large import quantize_large

    for mode in ("int4", "dynamic"):
        quantized, _, _ = quantize_large(path, Step("quantize", {"mode": mode}), Context(workdir=tmp_path))
        graph_session = ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"])
        assert op_types(onnx.load(str(quantized), load_external_data=False))["GroupQueryAttention"] == LAYERS
        assert np.abs(run(graph_session, ids, mask, None)[0] - in_memory[0]).max() < 0.25


def test_a_failed_check_on_the_miniature_leaves_the_export_unfused(
        exports: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from compressor_onnx import kv_fusion_export
    from compressor_onnx.export import export_graph

    monkeypatch.setattr(kv_fusion_export, "TOLERANCE", -1.0)  # no difference is ever small enough
    graph, _ = export_graph(exports["model"], Context(workdir=tmp_path))
    assert "GroupQueryAttention" not in op_types(graph) and "Softmax" in op_types(graph)


def test_projections_with_biases_are_packed_with_their_biases(tmp_path: Path) -> None:
    from compressor_frontends.pytorch.kv_export import export_with_cache
    from compressor_onnx.export import export_graph

    # Qwen2's attention: Q, K and V with a bias each (the miniature's biases are random, not zero).
    model = tiny_llama(tmp_path / "model", attention_bias=True)
    with torch_no_grad():
        for layer in model.module.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.uniform_(-1, 1)
    fused, _ = export_graph(model, Context(workdir=tmp_path))
    plain, _ = export_with_cache(model, Context(workdir=tmp_path))
    ops = op_types(fused)
    assert ops["Split"] == LAYERS and ops["MatMul"] == 5 * LAYERS + 1
    biased = [node for node in fused.graph.node if node.op_type == "Add" and node.output[0].endswith("qkv_proj_biased")]
    assert len(biased) == LAYERS
    assert_computes_the_same(fused, plain)


def torch_no_grad() -> Any:
    import torch

    return torch.no_grad()


def test_a_rewrite_the_miniature_disproves_leaves_the_attention_alone_fused(
        exports: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from compressor_onnx import kv_fusion_export
    from compressor_onnx.export import export_graph
    from compressor_onnx.kv_fusion_norms import fuse_norms

    def misread_norms(graph: Any) -> int:  # a wrong epsilon: what a misread pattern would compute
        fused = fuse_norms(graph)
        for node in graph.graph.node:
            for attribute in node.attribute:
                if node.op_type == "SkipSimplifiedLayerNormalization" and attribute.name == "epsilon":
                    attribute.f = 10.0
        return fused

    monkeypatch.setattr(kv_fusion_export, "fuse_norms", misread_norms)
    graph, _ = export_graph(exports["model"], Context(workdir=tmp_path))
    ops = op_types(graph)
    assert ops["GroupQueryAttention"] == LAYERS and "SkipSimplifiedLayerNormalization" not in ops
    assert "Split" not in ops and ops["Pow"] == 2 * LAYERS + 1
    assert_computes_the_same(graph, exports["plain"])


def test_only_a_causal_and_padding_mask_is_rebuilt_from_the_attention_mask() -> None:
    import transformers

    from compressor_onnx.kv_fusion_export import padding_only_mask

    def model(config: Any) -> Any:
        return type("Model", (), {"config": config})()

    assert padding_only_mask(model(transformers.LlamaConfig()))
    assert padding_only_mask(model(transformers.Qwen2Config(use_sliding_window=False, sliding_window=4096)))
    assert not padding_only_mask(model(transformers.Qwen2Config(use_sliding_window=True, sliding_window=4096)))
    assert not padding_only_mask(model(transformers.MistralConfig(sliding_window=4096)))
    assert padding_only_mask(model(transformers.GPT2Config()))
    assert not padding_only_mask(model(transformers.Gemma2Config()))  # sliding and full layers


def test_projections_stored_as_external_data_are_packed_into_a_file_of_their_own(
        exports: dict[str, Any], tmp_path: Path) -> None:
    import copy

    import onnx
    import onnxruntime as ort

    from compressor_onnx.kv_fusion_export import fuse_export
    from compressor_onnx.kv_fusion_qkv import PACKED_DATA

    # As a model past 2 GB is exported: every weight in a data file beside the graph.
    path = tmp_path / "export" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(copy.deepcopy(exports["plain"]), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    assert fuse_export(exports["model"], None, path, Context(workdir=tmp_path)) == LAYERS
    on_disk = onnx.load(str(path), load_external_data=False)
    assert op_types(on_disk)["Split"] == LAYERS
    packed = [tensor for tensor in on_disk.graph.initializer if tensor.name.endswith("qkv_proj.weight")]
    assert len(packed) == LAYERS and all(
        {entry.key: entry.value for entry in tensor.external_data}["location"] == f"{PACKED_DATA}.data"
        for tensor in packed)
    rng = np.random.default_rng(7)
    ids, mask = rng.integers(0, VOCABULARY, size=(1, 6)), np.ones((1, 6), np.int64)
    from_disk = run(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), ids, mask, None)
    in_memory = run(session(exports["fused"]), ids, mask, None)
    assert all(np.array_equal(first, second) for first, second in zip(from_disk, in_memory))


def test_decoding_the_fused_graph_appends_to_the_cache_in_place(exports: dict[str, Any], tmp_path: Path) -> None:
    import onnx

    from compressor.generation import decoder_of, generate
    from compressor.models import Artifact, MeasureSettings
    from compressor_onnx.runtime import OnnxRuntime

    onnx.save_model(exports["fused"], str(tmp_path / "fused.onnx"))
    artifact = Artifact("onnx", tmp_path / "fused.onnx", "onnx")
    shared, copying = OnnxRuntime(artifact, MeasureSettings()), OnnxRuntime(artifact, MeasureSettings())
    assert shared._bound.shared
    copying._bound.shared = False
    prompt = np.random.default_rng(8).integers(0, VOCABULARY, 9)
    # 75 tokens: past the first buffers' room (the first step's 10 positions and 64 more): they grow once.
    assert generate(decoder_of(shared), prompt, 75).tokens == generate(decoder_of(copying), prompt, 75).tokens
    decoder, reference = decoder_of(shared), decoder_of(copying)
    assert np.array_equal(decoder.prefill(prompt), reference.prefill(prompt))
    assert np.array_equal(decoder.decode(2), reference.decode(2))
    buffers = dict(shared._bound.buffers)  # the prompt's cache, moved once into buffers with room
    kept = [np.array(view) for view in decoder.past]  # a caller's copy of the cache after one step
    branch = list(decoder.past)
    for token in (3, 5, 7):
        assert np.array_equal(decoder.decode(token), reference.decode(token))
    # The steps wrote into the buffers the first step's present is a view of, and left that view as it was.
    assert all(view.base is buffers[name] for name, view in shared._bound.views.items())
    assert all(np.array_equal(view, copy) for view, copy in zip(branch, kept))
    # Going on from the older view (a branch) copies: the newer views stay as they were.
    newer = {name: np.array(view) for name, view in shared._bound.views.items()}
    decoder.past, decoder.length = branch, len(prompt) + 1
    reference.prefill(prompt)
    reference.decode(2)
    assert np.array_equal(decoder.decode(11), reference.decode(11))
    assert all(np.array_equal(view, newer[name]) for name, view in shared._bound.views.items())


def test_int4_of_a_language_model_takes_blocks_of_128_unless_the_step_sets_them(
        exports: dict[str, Any], tmp_path: Path) -> None:
    """A generation-ready graph gets GPTQ's and ONNX Runtime's group size where the step leaves it
    unset (the step's text unchanged); a size the user gives, a graph without a cache, and a toy
    model whose MatMuls have fewer than 128 input rows (the fixture's: hidden 32) keep theirs."""
    import onnx

    from compressor.recipes import parse_step
    from compressor.validation import validate_step
    from compressor_onnx.export import export_graph
    from compressor_onnx.int4_settings import for_model
    from compressor_onnx.plugin import backend as onnx_backend
    from compressor_onnx.quantization import quantize_graph

    backend = onnx_backend()
    wider, _ = export_graph(tiny_llama(tmp_path / "wider", hidden_size=128, intermediate_size=256),
                            Context(workdir=tmp_path))

    def blocks(graph: Any, text: str) -> tuple[set[int], Any, str]:
        step = validate_step(backend, parse_step(text))
        result, _, metadata = quantize_graph(graph, step, Context(workdir=tmp_path), tmp_path)
        sizes = {attribute.i for node in result.graph.node if node.op_type == "MatMulNBits"
                 for attribute in node.attribute if attribute.name == "block_size"}
        return sizes, metadata["int4"]["block_size"], str(step)

    assert blocks(wider, "quantize int4") == ({128}, 128, "quantize int4")
    assert blocks(wider, "quantize int4 block_size=32") == ({32}, 32, "quantize int4 block_size=32")
    assert blocks(exports["fused"], "quantize int4") == ({32}, 32, "quantize int4")
    # The same graph without its cache inputs is no generation-ready model.
    one_pass = onnx.ModelProto()
    one_pass.CopyFrom(wider)
    for value in [value for value in one_pass.graph.input if value.name.startswith("past_key_values.")]:
        one_pass.graph.input.remove(value)
    step = validate_step(backend, parse_step("quantize int4"))
    assert for_model(step, one_pass).params["block_size"] == "32"
    assert for_model(step, wider).params["block_size"] == "128"
