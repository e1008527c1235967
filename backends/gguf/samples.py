"""The gguf backend's sample model for ``compressor demo`` and conformance: a tiny GPT-2
Hugging Face folder written with NumPy alone (random weights, GPT-2's layout and names),
a byte-level BPE tokenizer.json (the 256 byte tokens, an end token and a few merges) and
evaluation token ids. Nothing is downloaded; neither torch nor transformers is needed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

LAYERS, WIDTH, HEADS, POSITIONS, VOCAB = 2, 256, 4, 128, 320
END_TOKEN = "<|endoftext|>"
#: A few BPE merges ("Ġ" is the space byte in GPT-2's byte alphabet).
MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"), ("r", "e"))


def byte_alphabet() -> list[str]:
    """GPT-2's bytes-to-unicode table: the printable character standing for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return [table[byte] for byte in range(256)]


def tokenizer_json() -> dict[str, Any]:
    """Byte tokens 0-255, the end token 256, then the merged pairs (llama.cpp needs merges)."""
    vocab = {token: index for index, token in enumerate(byte_alphabet())}
    for pair in MERGES:
        vocab["".join(pair)] = len(vocab) + 1  # + 1: the end token holds 256
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": 256, "content": END_TOKEN, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [list(pair) for pair in MERGES]},
    }


def gpt2_weights(seed: int = 0) -> dict[str, Any]:
    """GPT-2's tensors (Conv1D weights [in, out]), random with GPT-2's initial scale; the
    embeddings a little larger so that the next token is not a coin toss."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def normal(*shape: int, scale: float = 0.02) -> Any:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    weights = {"transformer.wte.weight": normal(VOCAB, WIDTH, scale=0.1),
               "transformer.wpe.weight": normal(POSITIONS, WIDTH, scale=0.01),
               "transformer.ln_f.weight": np.ones(WIDTH, np.float32),
               "transformer.ln_f.bias": np.zeros(WIDTH, np.float32)}
    for layer in range(LAYERS):
        prefix = f"transformer.h.{layer}."
        for name, (rows, columns) in {"attn.c_attn": (WIDTH, 3 * WIDTH), "attn.c_proj": (WIDTH, WIDTH),
                                      "mlp.c_fc": (WIDTH, 4 * WIDTH), "mlp.c_proj": (4 * WIDTH, WIDTH)}.items():
            weights[prefix + name + ".weight"] = normal(rows, columns)
            weights[prefix + name + ".bias"] = np.zeros(columns, np.float32)
        for norm in ("ln_1", "ln_2"):
            weights[prefix + norm + ".weight"] = np.ones(WIDTH, np.float32)
            weights[prefix + norm + ".bias"] = np.zeros(WIDTH, np.float32)
    return weights


def write_safetensors(path: Path, tensors: dict[str, Any]) -> None:
    """float32 tensors in the safetensors layout: header length, JSON header, data."""
    header: dict[str, Any] = {}
    offset = 0
    for name, array in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as stream:
        stream.write(struct.pack("<Q", len(encoded)) + encoded)
        for array in tensors.values():
            stream.write(array.tobytes())


def write_gpt2_sample(directory: Path) -> tuple[Path, Path]:
    """The folder and an ``.npz`` of evaluation ids (48 rows of 16 byte tokens, no padding)."""
    import numpy as np

    folder = directory / "tiny-gpt2"
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
              "n_layer": LAYERS, "n_embd": WIDTH, "n_head": HEADS, "n_positions": POSITIONS, "n_ctx": POSITIONS,
              "vocab_size": VOCAB, "layer_norm_epsilon": 1e-5, "bos_token_id": 256, "eos_token_id": 256,
              "tie_word_embeddings": True}
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json()), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2TokenizerFast", "bos_token": END_TOKEN, "eos_token": END_TOKEN,
         "model_max_length": POSITIONS}), encoding="utf-8")
    write_safetensors(folder / "model.safetensors", gpt2_weights())
    ids = np.random.default_rng(1).integers(0, 256, size=(48, 16), dtype=np.int64)
    eval_data = directory / "tiny-gpt2-eval.npz"
    np.savez(eval_data, input_ids=ids, attention_mask=np.ones_like(ids))
    return folder, eval_data
