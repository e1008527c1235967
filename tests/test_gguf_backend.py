"""The gguf backend: Hugging Face causal LMs (GPT-2, Llama with grouped-query attention,
Qwen2 with q/k/v biases) built by transformers from tiny configs, converted to GGUF,
quantized and run by llama.cpp, compared with transformers' own logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import compressor_gguf.plugin as plugin
from compressor.plugin import Context, MeasureSettings, Step, UnsupportedError
from compressor.testing import check_backend, registered

TEXT = [f"the quick brown fox number {i} jumps over the lazy dog and runs into the forest" for i in range(60)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny causal LMs saved by transformers with a byte-level BPE tokenizer trained in-test."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("gguf-models")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                                     eos_token="<|endoftext|>")
    configs = {
        "gpt2": transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=512),
        # GQA: 4 query heads share 2 key/value heads; 256 wide so llama.cpp's k-quants apply.
        "llama": transformers.LlamaConfig(num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                          max_position_embeddings=128, initializer_range=0.05),
        "qwen2": transformers.Qwen2Config(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                          max_position_embeddings=128),
        # Per-head q/k RMSNorms and a head_dim of 32 (not 64 / 4): llama.cpp's key_length.
        "qwen3": transformers.Qwen3Config(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                          vocab_size=512, max_position_embeddings=128),
        # Fused qkv_proj and gate_up_proj; rotation over 3/4 of each head (Phi-4-mini's partial rotary,
        # and its byte-level BPE; test_gguf_sentencepiece.py converts one with Phi-3's tokenizer.model).
        "phi-4-mini": transformers.Phi3Config(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                              max_position_embeddings=128, original_max_position_embeddings=128,
                                              pad_token_id=0, partial_rotary_factor=0.75),
        "bert": transformers.BertConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=2, vocab_size=512),
    }
    torch.manual_seed(0)
    found = {}
    for name, config in configs.items():
        model = (transformers.BertModel if name == "bert" else transformers.AutoModelForCausalLM.from_config)(config)
        if name == "llama":
            train(model, torch.tensor(tokenizer(TEXT[:16])["input_ids"]))
        if name in ("qwen3", "phi-4-mini"):  # norms of ones would hide a norm weight misplaced
            with torch.no_grad():
                for key, parameter in model.named_parameters():
                    if key.endswith("norm.weight"):
                        parameter.uniform_(0.5, 1.5)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        found[name] = root / name
    return found


def train(model: Any, ids: Any, steps: int = 30) -> None:
    """A few steps on the sentences, so that the next token is no coin toss (random weights
    give near-flat logits, whose top-1 any rounding flips)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # measured 0.1 s a step; 1.4 s with two threads on a busy 2-core machine
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            optimizer.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
        model.eval()
    finally:
        torch.set_num_threads(threads)


def context(tmp_path: Path, **options: Any) -> Context:
    workdir = tmp_path / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    return Context(options={"outtype": "auto", **options}, workdir=workdir)


def saved(folder: Path, tmp_path: Path, step: str | None = None, **options: Any) -> Path:
    """The folder converted (and quantized by ``step``) and saved as a .gguf, through the hooks."""
    ctx = context(tmp_path, **options)
    model = plugin.compressor_load(folder, "gguf", ctx)
    if step is not None:
        model = plugin.compressor_compress(model, Step("quantize", {"mode": step}), ctx)
    staging = tmp_path / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    return plugin.compressor_save(model, staging / f"{folder.name}-{step or 'original'}", ctx).path


def llama_cpp_logits(path: Path, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    from compressor.plugin import Artifact

    runtime = plugin.compressor_open_runtime(Artifact("gguf", path, "gguf"), MeasureSettings(threads=2))
    try:
        feeds = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
        return runtime.run(feeds)["logits"]
    finally:
        runtime.close()


def transformers_logits(folder: Path, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
        return model(torch.from_numpy(ids), **kwargs).logits.numpy()


IDS = np.random.default_rng(0).integers(0, 400, size=(3, 24), dtype=np.int64)


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "qwen3", "phi-4-mini"])
def test_converted_logits_match_transformers(name: str, folders: dict[str, Path], tmp_path: Path) -> None:
    mask = np.ones_like(IDS)
    mask[1, 15:] = 0  # a right-padded row: its valid positions must not change
    expected = transformers_logits(folders[name], IDS, mask)
    got = llama_cpp_logits(saved(folders[name], tmp_path), IDS, mask)
    valid = mask.astype(bool)
    assert got.shape == expected.shape
    # f32 weights; llama.cpp keeps the attention cache in f16. Measured: 1.4e-4 gpt2 and qwen2 (logits
    # within +-1.5), 5.1e-3 llama (256 wide and trained: logits to -4).
    assert np.abs(got[valid] - expected[valid]).max() < 1e-2
    assert (got[valid].argmax(-1) == expected[valid].argmax(-1)).all()
    assert not got[~valid].any()  # padded positions are zeros, left out by core through the mask
    half = llama_cpp_logits(saved(folders[name], tmp_path / "f16", outtype="f16"), IDS)
    assert np.abs(half - transformers_logits(folders[name], IDS)).max() < 3e-2  # f16 weights


def test_pytorch_bin_folders_convert_like_safetensors(folders: dict[str, Path], tmp_path: Path) -> None:
    import torch
    import transformers

    folder = tmp_path / "gpt2-bin"
    folder.mkdir()
    for file in folders["gpt2"].iterdir():
        if file.suffix != ".safetensors":
            (folder / file.name).write_bytes(file.read_bytes())
    state = transformers.AutoModelForCausalLM.from_pretrained(folders["gpt2"]).state_dict()
    torch.save(state, folder / "pytorch_model.bin")
    from_bin = llama_cpp_logits(saved(folder, tmp_path / "bin"), IDS)
    assert np.array_equal(from_bin, llama_cpp_logits(saved(folders["gpt2"], tmp_path / "st"), IDS))


def test_quantized_sizes_and_agreement(folders: dict[str, Path], tmp_path: Path) -> None:
    import transformers

    ids = np.asarray(transformers.AutoTokenizer.from_pretrained(folders["llama"])(TEXT[:8])["input_ids"])
    original = saved(folders["llama"], tmp_path)
    reference = llama_cpp_logits(original, ids).argmax(-1)
    sizes, agreement = {}, {}
    for mode in ("q8_0", "q4_k_m"):
        path = saved(folders["llama"], tmp_path / mode, mode)
        sizes[mode] = path.stat().st_size / original.stat().st_size
        agreement[mode] = float((llama_cpp_logits(path, ids).argmax(-1) == reference).mean())
    # Measured 0.268 and 0.156: 8.5 and about 4.5-6.6 bits per weight of 32, plus f32 norms and the header.
    assert 0.26 < sizes["q8_0"] < 0.30, sizes
    assert 0.14 < sizes["q4_k_m"] < 0.20, sizes
    # Measured 0.9375 for both on 128 positions: the flips are the digit after "number", where the
    # trained model's top tokens tie.
    assert agreement["q8_0"] >= 0.9 and agreement["q4_k_m"] >= 0.85, agreement


def test_gguf_files_load_and_quantized_ones_are_not_quantized_again(folders: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    original = saved(folders["qwen2"], tmp_path)
    assert plugin.compressor_identify(original) == "gguf"
    quantized = saved(original, tmp_path / "from-file", "int4")  # the shared int4 is q4_0
    assert plugin.compressor_identify(quantized) == "gguf"
    ctx = context(tmp_path)
    model = plugin.compressor_load(quantized, "gguf", ctx)
    assert model.metadata["source_file_type"] == "Q4_0"
    assert original.read_bytes() != quantized.read_bytes() and quantized.stat().st_size < original.stat().st_size / 4
    with pytest.raises(UnsupportedError, match="already quantized"):
        plugin.compressor_check_steps(model, [Step("quantize", {"mode": "q8_0"})], ctx)
    agreement = (llama_cpp_logits(quantized, IDS).argmax(-1) == llama_cpp_logits(original, IDS).argmax(-1)).mean()
    assert agreement > 0.6  # random weights, 64 wide, near-flat logits: measured 0.78 on one like it


@pytest.mark.slow
def test_cli_run_with_text_data(folders: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "eval.txt"
    data.write_text("\n".join(TEXT[:12]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "compressor", "run", str(folders["gpt2"]), "--backend", "gguf",
                           "-q", "q8_0", "-q", "q4_k_m", "--data", str(data), "--out", str(out),
                           "--min-seconds", "0.05", "--precision", "off", "--set", "prompt_tokens=12",
                           "--set", "new_tokens=6", "--set", "perplexity_window=16"], capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    variants = {variant["name"]: variant for variant in report["variants"]}
    assert set(variants) == {"original", "q8_0", "q4_k_m"}
    assert variants["q8_0"]["metadata"]["gguf_file_type"] == "Q8_0"
    assert variants["q4_k_m"]["metadata"]["gguf_tensor_types"]["f32"] > 0
    assert variants["q8_0"]["metrics"]["headline_metric"] == "next_token_agreement"
    assert variants["q8_0"]["metrics"]["agreement"] > 0.9
    assert sorted(path.suffix for path in out.rglob("*.gguf")) == [".gguf"] * 3
    # Generation through llama.cpp's own cache, measured by the same code as the onnx backend's.
    for name, variant in variants.items():
        metrics = variant["metrics"]
        assert metrics["prompt_tokens"] == 12 and metrics["new_tokens"] == 6, name
        assert metrics["ttft_ms"] > 0 and metrics["decode_tokens_per_s"] > 0 and "CPU cache" in metrics["bandwidth_note"]
        assert metrics["window_perplexity"] > 1 and 0 <= metrics["greedy_agreement"] <= 1
    assert variants["original"]["metrics"]["greedy_exact"] == 1.0
    assert "bandwidth_share" not in variants["q4_k_m"]["metrics"]  # 1 MB of weights: read from cache
    # KL from the original's next-token distributions, through llama.cpp's logits: q4 moves them more.
    kl = {name: variants[name]["metrics"]["kl_divergence"] for name in ("q8_0", "q4_k_m")}
    assert 0 <= kl["q8_0"] < kl["q4_k_m"] < 1, kl


@pytest.mark.parametrize("model_type", ["bert", "invented"])
def test_unknown_architecture_refused_before_work(model_type: str, folders: dict[str, Path],
                                                   tmp_path: Path) -> None:
    folder = folders["bert"]
    if model_type == "invented":
        folder = tmp_path / "invented"
        folder.mkdir()
        for file in folders["gpt2"].iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "invented"}))
    with pytest.raises(UnsupportedError, match=f"model_type '{model_type}' is not one"):
        plugin.compressor_load(folder, "gguf", context(tmp_path))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "compressor", "run", str(folder), "--backend", "gguf", "-q", "q8_0",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 5, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and model_type in done.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(("edit", "refusal"), [
    ("activation", "GPT-2 with activation 'relu'"),
    ("wordpiece", "WordPiece tokenizer.json; llama.cpp's gpt2 converter writes byte-level BPE"),
    ("headless", "not a causal language model"),
])
def test_what_llama_cpp_would_run_differently_is_refused_at_load(edit: str, refusal: str,
                                                                 folders: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / edit
    folder.mkdir()
    for file in folders["gpt2"].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    if edit == "activation":
        config["activation_function"] = "relu"
    elif edit == "wordpiece":  # SentencePiece converts for Llama (test_gguf_sentencepiece.py); WordPiece nowhere
        tokenizer["model"] = {"type": "WordPiece", "vocab": tokenizer["model"]["vocab"], "unk_token": "<|endoftext|>"}
    else:
        config["architectures"] = ["GPT2Model"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(UnsupportedError, match=refusal):
        plugin.compressor_load(folder, "gguf", context(tmp_path))
    assert not any((tmp_path / "work").iterdir())


def test_conforms(tmp_path: Path) -> None:
    with registered(plugin, "gguf"):
        (report,) = check_backend("gguf", tmp_path)
    variant = report.variant("q4_k_m")
    assert variant.metadata["gguf_file_type"] == "Q4_K_M"
    assert variant.metadata["gguf_tensor_types"] == {"f32": 19, "q4_k": 6, "q6_k": 3}
    assert variant.metrics["agreement"] > 0.9 and variant.metrics["cosine"]["mean"] > 0.99


@pytest.mark.parametrize("name, tied", [("gpt2", True), ("llama", False)])
def test_a_token_reads_every_weight_but_an_untied_embedding_table(name: str, tied: bool, folders: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    """The bandwidth bound's bytes: llama.cpp gathers one row of token_embd per token; where the
    output layer is that table (GPT-2's tied embeddings), it is read whole."""
    from compressor_gguf.runtime import streamed_weight_bytes

    path = saved(folders[name], tmp_path)
    config = json.loads((folders[name] / "config.json").read_text())
    table = config["vocab_size"] * config.get("hidden_size", config.get("n_embd")) * 4  # f32
    header = path.stat().st_size - streamed_weight_bytes(path) - (0 if tied else table)
    assert 0 < header < 64 * 1024  # metadata, vocabulary and alignment; no weights
