"""YaRN rotary scaling (Qwen2.5's documented long-context setting, YaRN-extended Llamas) converted
for llama.cpp's ``llama`` and ``qwen2``: tiny models built by transformers whose original context
of 32 positions is stretched 4 times, run by llama.cpp on 96 tokens and compared with transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_gguf_backend import TEXT, context, llama_cpp_logits, saved, transformers_logits
from test_gguf_sentencepiece import metadata

import compressor_gguf.convert as convert
import compressor_gguf.plugin as plugin
from compressor.plugin import UnsupportedError

#: Qwen2.5's ``rope_scaling`` (transformers 4's spelling; 32768 original positions there).
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
#: 96 tokens: positions 32-95 lie past the original context. Random weights give near-flat logits: with
#: these ids transformers' top two logits stand at least twice llama.cpp's error apart (measured).
IDS = np.random.default_rng(4).integers(0, 300, size=(1, 96), dtype=np.int64)
#: Weights drawn wider than transformers' 0.02, so that attention, and with it the rotation, moves
#: the logits (at 0.02 yarn and the plain rotation differ by 6e-3 only).
INITIALIZER_RANGE = 0.1


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


def yarn_model(folder: Path, arch: str, rope: dict[str, Any], tokenizer: Any) -> Path:
    """A tiny Llama, Qwen2 or Qwen3 (128 positions) with ``rope``: the Llama's config.json as transformers 5
    writes it (``rope_parameters``), the Qwens' as Qwen2.5 and Qwen3 ship (transformers 4's ``rope_scaling``
    and a top-level ``rope_theta``, which transformers 5 reads back as ``rope_parameters``)."""
    import torch
    import transformers

    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}
    config_class, model_class = classes[arch]
    config = config_class(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=320, max_position_embeddings=128,
                          initializer_range=INITIALIZER_RANGE, rope_parameters={"rope_theta": 10000.0, **rope})
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if arch == "llama":
        return folder
    saved_config = json.loads((folder / "config.json").read_text())
    saved_config.pop("rope_parameters")
    saved_config.update(rope_theta=10000.0, rope_scaling=rope)
    (folder / "config.json").write_text(json.dumps(saved_config))
    return folder


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_yarn_logits_match_transformers_past_the_original_context(arch: str, tokenizer: Any, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    folder = yarn_model(tmp_path / "model", arch, YARN, tokenizer)
    expected = transformers_logits(folder, IDS)
    path = saved(folder, tmp_path / "yarn")
    got = llama_cpp_logits(path, IDS)
    difference = np.abs(got - expected).max()
    # f32 weights, llama.cpp's f16 attention cache, as the default rotation's tests. Measured: 2.4e-3 llama,
    # 1.4e-3 qwen2 (the same models with the default rotation: 2.1e-3 and 1.7e-3), 2.9e-3 qwen3.
    assert difference < 1e-2
    # The same top token wherever transformers' top two are further apart than the difference (the
    # qwen3 has one near-tie in 96 positions: 1.8e-4 apart).
    top_two = np.sort(expected, axis=-1)[..., -2:]
    clear = top_two[..., 1] - top_two[..., 0] > difference
    assert clear.mean() > 0.95 and (got.argmax(-1) == expected.argmax(-1))[clear].all()
    keys = metadata(path)
    assert keys[f"{arch}.rope.scaling.type"] == "yarn" and keys[f"{arch}.rope.scaling.factor"] == 4.0
    assert keys[f"{arch}.rope.scaling.original_context_length"] == 32
    assert f"{arch}.rope.scaling.attn_factor" not in keys  # transformers' default, llama.cpp's own
    # The keys are what makes it: without them llama.cpp rotates as at training (measured 2.6 and 2.3 apart,
    # top-1 agreement 0.42 both).
    monkeypatch.setattr(convert, "write_rope", lambda writer, config: writer.add_rope_freq_base(10000.0))
    plain = llama_cpp_logits(saved(folder, tmp_path / "plain"), IDS)
    assert np.abs(plain - expected).max() > 100 * difference
    assert (plain.argmax(-1) == expected.argmax(-1)).mean() < 0.9


@pytest.mark.parametrize(("arch", "rope", "relative"), [
    ("qwen2", {"attention_factor": 1.0}, 1.0 / (0.1 * np.log(4.0) + 1)),
    ("llama", {"mscale": 1.0, "mscale_all_dim": 0.5}, 1.0 / (0.05 * np.log(4.0) + 1)),
])
def test_yarn_attention_factor_written_where_llama_cpp_reads_it(arch: str, rope: dict[str, Any], relative: float,
                                                                tokenizer: Any, tmp_path: Path) -> None:
    """An attention factor other than transformers' default ``0.1 ln(factor) + 1``: written as
    ``rope.scaling.attn_factor``, relative to that default (the converter's ``yarn_attn_factor``
    changed nothing, measured; without either key llama.cpp's logits lie 1.0 and 0.93 from transformers')."""
    folder = yarn_model(tmp_path / "model", arch, {**YARN, **rope}, tokenizer)
    expected = transformers_logits(folder, IDS)
    path = saved(folder, tmp_path / "out")
    got = llama_cpp_logits(path, IDS)
    assert np.abs(got - expected).max() < 1e-2  # measured 1.8e-3 and 2.3e-3
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    assert metadata(path)[f"{arch}.rope.scaling.attn_factor"] == pytest.approx(relative, rel=1e-6)


@pytest.mark.parametrize(("rope", "refusal"), [
    ({"truncate": False}, "'yarn' with truncate=false"),
    ({"beta_slow": 2.0}, "'yarn' with beta_slow 2: llama.cpp as llama-cpp-python opens it runs 1"),
    ({"extrapolation_factor": 0.5}, "'yarn' with extrapolation_factor 0.5: transformers ignores it"),
    ({"factor": None}, "'yarn' without a numeric factor"),
    ({"beta_fast": "32"}, "'yarn' with a beta_fast that is no number"),
])
def test_yarn_settings_llama_cpp_would_run_differently_are_refused(rope: dict[str, Any], refusal: str,
                                                                   tokenizer: Any, tmp_path: Path) -> None:
    """Measured with the refusal lifted (this Llama, another prompt): truncate=false 2.6 and beta_slow 2
    2.9 from transformers' logits (the same with llama-cpp-python told to take the betas from the file)."""
    folder = yarn_model(tmp_path / "model", "llama", YARN, tokenizer)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {key: value for key, value in {**YARN, "rope_theta": 10000.0, **rope}.items()
                                 if value is not None}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match=f"rotary scaling {refusal}"):
        plugin.compressor_load(folder, "gguf", context(tmp_path))
    assert not any((tmp_path / "work").iterdir())


@pytest.mark.parametrize("top_level", [None, 64])
def test_yarn_original_context_is_the_one_transformers_stretches(top_level: int | None) -> None:
    """transformers 5 takes a top-level ``original_max_position_embeddings`` before the setting's
    (``standardize_rope_params``): the frequencies it computes are those of the context written."""
    import torch
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from compressor_gguf.rope import yarn_original_context

    config = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 128,
              "rope_parameters": {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0,
                                  "original_max_position_embeddings": 32}}
    if top_level is not None:
        config["original_max_position_embeddings"] = top_level
    written = yarn_original_context(config)
    assert written == (top_level or 32)
    stretched, _ = ROPE_INIT_FUNCTIONS["yarn"](transformers.LlamaConfig(**config), "cpu")
    alone = {**config, "rope_parameters": {**config["rope_parameters"], "original_max_position_embeddings": written}}
    alone.pop("original_max_position_embeddings", None)
    expected, _ = ROPE_INIT_FUNCTIONS["yarn"](transformers.LlamaConfig(**alone), "cpu")
    assert torch.equal(stretched, expected)
    if top_level is not None:  # and the two contexts do give other frequencies
        other = {**alone, "rope_parameters": {**alone["rope_parameters"], "original_max_position_embeddings": 32}}
        assert not torch.equal(stretched, ROPE_INIT_FUNCTIONS["yarn"](transformers.LlamaConfig(**other), "cpu")[0])
