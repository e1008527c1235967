"""The gguf backend on Llama-family checkpoints as they ship: a SentencePiece tokenizer (Llama 2,
Mistral 7B v0.1, TinyLlama) trained in-test and written as llama.cpp's ``llama`` tokenizer, and
Llama 3's rotary scaling written as a ``rope_freqs`` tensor; llama.cpp must tokenize as
SentencePiece and the Hugging Face tokenizer do and compute transformers' logits."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_gguf_backend import context, llama_cpp_logits, saved, train, transformers_logits

import compressor_gguf.plugin as plugin
from compressor.plugin import UnsupportedError

SYLLABLES = ["ka", "ro", "ni", "sta", "ble", "an", "ter", "on", "ing", "ed", "qu", "ick", "bro", "wn", "ma", "ri",
             "po", "lo", "ve"]
#: Words of overlapping syllables, so that the order of BPE merges decides how a word splits.
WORDS = ["".join(random.Random(index).choices(SYLLABLES, k=1 + index % 4)) for index in range(300)]
#: Text the tokenizer never saw: digits, bytes it must fall back to, runs of spaces, a newline.
PROBES = ["the quick brown fox", "  leading spaces and   runs", "numbers 12345 and 3.14", "naïve café 🦙 北京",
          "line one\nline two", "Capitalized Words Unseen", "x"]


def sentences(count: int, seed: int = 0) -> list[str]:
    chooser = random.Random(seed)
    return [" ".join(chooser.choice(WORDS) for _ in range(chooser.randint(6, 14))) + f" {index}"
            for index in range(count)]


def probes() -> list[str]:
    """:data:`PROBES`, unseen sentences, and run-together syllables. Scored as llama.cpp's own
    converter scores a tokenizer.json (-1000 each), 2 of these 36 split differently (measured)."""
    chooser = random.Random(1)
    return [*PROBES, *sentences(10, seed=2), *("".join(chooser.choices(SYLLABLES, k=6)) for _ in range(20))]


def token_rows(tokenizer: Any, rows: int, length: int) -> np.ndarray:
    """``rows`` x ``length`` ids of the sentences, each row starting with the tokenizer's BOS."""
    ids = tokenizer(" ".join(sentences(rows * length // 4)))["input_ids"]
    return np.asarray([ids[:1] + ids[1 + row * length:row * length + length] for row in range(rows)], dtype=np.int64)


def sentencepiece_model(vocab_size: int = 512) -> bytes:
    """A BPE SentencePiece model trained as Llama 2's was: byte fallback, digits split, no
    normalization, a dummy prefix, spaces kept."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences(400)), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    return model.getvalue()


@pytest.fixture(scope="module")
def llama2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny trained Llama with a SentencePiece tokenizer: ``model`` holds tokenizer.model and the
    tokenizer.json transformers converts it to (as Llama 2 ships), ``json`` the tokenizer.json alone,
    ``slow`` tokenizer.model and tokenizer_config.json alone (as the first Llama conversions)."""
    import torch
    import transformers

    root = tmp_path_factory.mktemp("gguf-sentencepiece")
    (root / "spm").mkdir()
    (root / "spm" / "tokenizer.model").write_bytes(sentencepiece_model())
    (root / "spm" / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "legacy": False}))
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "spm")
    # vocab_size past the 512 pieces, as Llama checkpoints pad theirs: ids 512-527 are [PADn].
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=528,
                                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    train(model, torch.from_numpy(token_rows(tokenizer, 8, 24)), steps=20)
    folders = {"model": root / "llama2", "json": root / "llama2-json", "slow": root / "llama2-slow"}
    for name, folder in folders.items():
        model.save_pretrained(folder)
        if name != "slow":
            tokenizer.save_pretrained(folder)
    for name in ("model", "slow"):
        for file in (root / "spm").iterdir():
            if not (folders[name] / file.name).exists():
                (folders[name] / file.name).write_bytes(file.read_bytes())
    assert not (folders["json"] / "tokenizer.model").exists() and not (folders["slow"] / "tokenizer.json").exists()
    return folders


def metadata(path: Path) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(path)
    found = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    found["tensors"] = {tensor.name: tensor.data.copy() for tensor in reader.tensors if tensor.name == "rope_freqs.weight"}
    return found


@pytest.mark.parametrize("flavour", ["model", "json", "slow"])
def test_sentencepiece_tokenizer_tokenizes_as_transformers(flavour: str, llama2: dict[str, Path],
                                                           tmp_path: Path) -> None:
    import llama_cpp
    import sentencepiece
    import transformers

    source = "tokenizer.json" if flavour == "json" else "tokenizer.model"  # tokenizer.model first, as llama.cpp
    loaded = plugin.compressor_load(llama2[flavour], "gguf", context(tmp_path / "load"))
    assert loaded.metadata["tokenizer"] == f"llama.cpp llama from {source}" and not loaded.notes
    path = saved(llama2[flavour], tmp_path, outtype="f32")
    keys = metadata(path)
    assert keys["tokenizer.ggml.model"] == "llama" and keys["tokenizer.ggml.pre"] == "default"
    assert len(keys["tokenizer.ggml.tokens"]) == len(keys["tokenizer.ggml.scores"]) == 528
    assert keys["tokenizer.ggml.tokens"][512] == "[PAD512]" and keys["tokenizer.ggml.token_type"][512] == 5
    types = keys["tokenizer.ggml.token_type"]
    assert types[:3] == [2, 3, 3] and types[3:259] == [6] * 256  # unknown, control <s> </s>, 256 byte tokens
    assert (keys["tokenizer.ggml.bos_token_id"], keys["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert keys["tokenizer.ggml.add_bos_token"] is True and not keys.get("tokenizer.ggml.add_eos_token", False)
    assert "tokenizer.ggml.merges" not in keys
    expected = transformers.AutoTokenizer.from_pretrained(llama2[flavour])
    reference = sentencepiece.SentencePieceProcessor(model_file=str(llama2["model"] / "tokenizer.model"))
    runner = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        for text in probes():
            got = runner.tokenize(text.encode(), add_bos=True)
            assert got == [1, *reference.encode(text)], text
            # tokenizers' Metaspace prepends no "▁" to text that starts with a space, SentencePiece
            # (and llama.cpp) does: the one place transformers' converted tokenizer differs.
            if not text.startswith(" "):
                assert got == expected(text)["input_ids"], text
    finally:
        runner.close()


def test_sentencepiece_llama_logits_match_transformers(llama2: dict[str, Path], tmp_path: Path) -> None:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(llama2["model"])
    ids = token_rows(tokenizer, 3, 20)
    expected = transformers_logits(llama2["model"], ids)
    got = llama_cpp_logits(saved(llama2["model"], tmp_path), ids)
    # f32 weights, llama.cpp's f16 attention cache: as the byte-level BPE Llama (measured below 1e-3).
    assert np.abs(got - expected).max() < 1e-2
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_phi3_logits_match_transformers(tmp_path: Path) -> None:
    """Phi-3 with its SentencePiece tokenizer.model (as Phi-3 and Phi-3.5 ship), rotation over 3/4
    of each head, norm weights away from one."""
    import torch
    import transformers

    # Not "phi3": with this 512-piece tokenizer llama.cpp refused a phi3 file of that general.name
    # (the folder's) and opened the same file under another name (measured).
    folder = tmp_path / "tiny-phi"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(sentencepiece_model())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "legacy": False}))
    config = transformers.Phi3Config(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                     max_position_embeddings=128, original_max_position_embeddings=128,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2, partial_rotary_factor=0.75)
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config)
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if key.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    ids = np.random.default_rng(0).integers(0, 512, size=(3, 24), dtype=np.int64)
    path = saved(folder, tmp_path / "gguf")
    keys = metadata(path)
    assert keys["general.architecture"] == "phi3" and keys["phi3.rope.dimension_count"] == 12  # 0.75 * 16
    expected, got = transformers_logits(folder, ids), llama_cpp_logits(path, ids)
    # Measured 1.6e-4 (f32 weights, llama.cpp's f16 attention cache).
    assert np.abs(got - expected).max() < 1e-2
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def rope_llama(folder: Path, rope: dict[str, Any]) -> Path:
    """A tiny Llama with 256 positions whose rotary settings are ``rope`` (original context 64)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(sentences(60), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                                      max_position_embeddings=256, rope_parameters={"rope_theta": 10000.0, **rope})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|end|>").save_pretrained(folder)
    return folder


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@pytest.mark.parametrize("rope", [LLAMA3, {"rope_type": "linear", "factor": 4.0}], ids=["llama3", "linear"])
def test_rotary_scaling_logits_match_transformers_past_the_original_context(rope: dict[str, Any],
                                                                             tmp_path: Path) -> None:
    folder = rope_llama(tmp_path / "model", rope)
    ids = np.random.default_rng(1).integers(0, 300, size=(1, 200), dtype=np.int64)  # 300: the BPE's tokens
    expected = transformers_logits(folder, ids)
    path = saved(folder, tmp_path / "out")
    got = llama_cpp_logits(path, ids)
    assert np.abs(got - expected).max() < 1e-2  # positions 64-199 are where the scaling acts
    keys = metadata(path)
    if rope["rope_type"] == "llama3":
        factors = keys["tensors"]["rope_freqs.weight"]
        # head_dim 16: 8 frequencies, wavelengths 6.3 .. 6300 positions around the 16-64 band.
        assert factors.shape == (8,) and factors[0] == 1.0 and factors[-1] == 8.0
        assert ((factors[1:] - factors[:-1]) >= 0).all() and "llama.rope.scaling.type" not in keys
    else:
        assert keys["llama.rope.scaling.type"] == "linear" and keys["llama.rope.scaling.factor"] == 4.0
        assert not keys["tensors"]
    # The scaling matters: without it llama.cpp would compute other logits past position 64.
    plain = transformers_logits(rope_llama(tmp_path / "plain", {}), ids)
    assert np.abs(plain[0, 70:] - expected[0, 70:]).max() > 10 * np.abs(got - expected).max()


def test_llama3_factors_match_transformers_for_the_llama_3_1_config() -> None:
    """The rope_freqs of Llama 3.1 8B's config.json (the older ``rope_scaling`` spelling, theta at
    the top level): base frequencies over them are transformers' llama3 frequencies."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from compressor_gguf.rope import llama3_factors

    config = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
              "max_position_embeddings": 131072, "rope_scaling": {
                  "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}}
    expected, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](transformers.LlamaConfig(**config), "cpu")
    factors = np.asarray(llama3_factors(config, 128))
    base = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    assert attention_factor == 1.0 and (factors == 1).sum() == 29 and (factors == 8).sum() == 29
    assert np.abs(base / factors / expected.numpy() - 1).max() < 1e-6  # measured 1.9e-7: float32 frequencies


@pytest.mark.parametrize(("rope", "name"), [({"rope_type": "yarn", "factor": 4.0, "truncate": False,  # yarn: test_gguf_yarn.py
                                              "original_max_position_embeddings": 64}, "yarn"),
                                             ({"rope_type": "dynamic", "factor": 2.0}, "dynamic")])
def test_other_rotary_scaling_refused_by_name(rope: dict[str, Any], name: str, tmp_path: Path) -> None:
    folder = rope_llama(tmp_path / "model", LLAMA3)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match=f"rotary scaling '{name}'"):
        plugin.compressor_load(folder, "gguf", context(tmp_path))
    if name == "yarn":  # on the command line: one line, exit 5, nothing written
        out = tmp_path / "out"
        done = subprocess.run([sys.executable, "-m", "compressor", "run", str(folder), "--backend", "gguf",
                               "-q", "q8_0", "--out", str(out)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 5 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "rotary scaling 'yarn'" in done.stderr and (not out.exists() or not any(out.iterdir()))


def test_unreadable_tokenizer_model_falls_back_to_tokenizer_json_or_is_refused(tmp_path: Path) -> None:
    """A tokenizer.model sentencepiece cannot read (Llama 3's tiktoken file sits under that name)
    gives way to the byte-level tokenizer.json; with nothing else it is refused, exit 4."""
    from compressor.plugin import InvalidInputError

    folder = rope_llama(tmp_path / "model", {})
    (folder / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # tiktoken's format: base64 bytes, rank
    model = plugin.compressor_load(folder, "gguf", context(tmp_path))
    assert model.metadata["tokenizer"] == "llama.cpp gpt2 from tokenizer.json"
    (folder / "tokenizer.json").unlink()
    with pytest.raises(InvalidInputError, match="tokenizer.model that sentencepiece cannot read"):
        plugin.compressor_load(folder, "gguf", context(tmp_path))
