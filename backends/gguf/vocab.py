"""A Hugging Face folder's tokenizer as GGUF metadata (``tokenizer.ggml.*``), as llama.cpp's
``convert_hf_to_gguf.py`` writes it for byte-level BPE tokenizers (``_set_vocab_gpt2``).

Byte-level BPE (``tokenizer.json`` with a BPE model and a ByteLevel decoder: GPT-2, Llama 3,
Qwen2, Mistral's Tekken-in-tokenizer.json...) is written as llama.cpp's ``gpt2`` tokenizer:
every id up to the config's ``vocab_size`` (ids the tokenizer lacks as ``[PADn]``, unused),
added tokens as control (special) or user-defined tokens, the merges, and the special ids.
Other tokenizers (SentencePiece, WordPiece, Unigram) are refused before any work: llama.cpp
would need their scores, which compressor's converter does not write.

``tokenizer.ggml.pre`` (how llama.cpp splits text before BPE) is found as llama.cpp finds it:
the hash of the tokenizer's ids for a check text (:mod:`compressor_gguf.pretokenizers`).
A tokenizer llama.cpp does not know gets ``default``, said in a note: compressor feeds token
ids, so measurements are unaffected, but llama.cpp tokenizing raw text may split it
differently from the original tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.plugin import InvalidInputError, UnsupportedError, first_line

#: GGUF token types (gguf.TokenType), without importing gguf.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass(frozen=True)
class VocabPlan:
    """What the tokenizer adds to the GGUF file: llama.cpp's names and the token lists."""

    folder: Path
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    pre: str
    pre_known: bool


def read_tokenizer_json(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UnsupportedError("has no tokenizer.json: the gguf backend converts folders with a fast (byte-level "
                               "BPE) tokenizer, which llama.cpp needs in the file", folder)
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise InvalidInputError(f"has an unreadable tokenizer.json ({first_line(error)})", folder) from None
    if not isinstance(found, dict) or not isinstance(found.get("model"), dict):
        raise InvalidInputError("has a tokenizer.json without a model section", folder)
    return found


def _names(section: Any) -> list[str]:
    """The component types of a tokenizer.json section (a Sequence's members too)."""
    if not isinstance(section, dict):
        return []
    inner = section.get("pretokenizers") or section.get("decoders") or []
    return [str(section.get("type"))] + [name for item in inner for name in _names(item)]


def plan_vocab(folder: Path, vocab_size: int) -> VocabPlan:
    """The tokens for ids ``0 .. vocab_size - 1``; refuses tokenizers llama.cpp's gpt2 model cannot take."""
    tokenizer = read_tokenizer_json(folder)
    model = tokenizer["model"]
    byte_level = "ByteLevel" in _names(tokenizer.get("decoder")) or "ByteLevel" in _names(
        tokenizer.get("pre_tokenizer"))
    if model.get("type") != "BPE" or model.get("byte_fallback") or not byte_level:
        kind = f"{model.get('type')}{' with byte fallback (SentencePiece)' if model.get('byte_fallback') else ''}"
        raise UnsupportedError(f"has a {kind} tokenizer; compressor's GGUF converter writes byte-level BPE "
                               "tokenizers only (GPT-2, Llama 3, Qwen2 style)", folder)
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise InvalidInputError("has a tokenizer.json BPE model without a vocab", folder)
    if not model.get("merges"):
        raise InvalidInputError("has a BPE tokenizer.json without merges, which llama.cpp's tokenizer needs",
                                folder)
    reverse: dict[int, str] = {int(index): str(token) for token, index in vocab.items()}
    kinds: dict[int, int] = {}
    for added in tokenizer.get("added_tokens") or []:
        index = int(added["id"])
        reverse[index] = str(added["content"])
        kinds[index] = CONTROL if added.get("special") else USER_DEFINED
    largest = max(reverse, default=-1)
    if largest >= vocab_size:
        raise InvalidInputError(f"has a tokenizer with id {largest}, past the model's vocab_size {vocab_size}",
                                folder)
    tokens = tuple(reverse.get(index, f"[PAD{index}]") for index in range(vocab_size))
    types = tuple(kinds.get(index, NORMAL if index in reverse else UNUSED) for index in range(vocab_size))
    pre, known = pre_tokenizer(folder)
    return VocabPlan(folder, tokens, types, pre, known)


def pre_tokenizer(folder: Path) -> tuple[str, bool]:
    """llama.cpp's name of the folder's pre-tokenizer, and whether llama.cpp knows it."""
    from compressor_gguf.pretokenizers import CHECK_TEXT, PRE_TOKENIZERS

    try:
        from tokenizers import Tokenizer
    except ImportError:
        return "default", False
    try:
        ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(CHECK_TEXT).ids
    except Exception as error:  # noqa: BLE001 - tokenizers raises its own exception types
        raise InvalidInputError(f"has a tokenizer.json tokenizers cannot read ({first_line(error)})",
                                folder) from None
    name = PRE_TOKENIZERS.get(hashlib.sha256(str(ids).encode()).hexdigest())
    return (name, True) if name else ("default", False)


def write_vocab(writer: Any, plan: VocabPlan) -> None:
    """Add the tokenizer's keys to a ``gguf.GGUFWriter``: model, pre-tokenizer, tokens, merges, ids."""
    import logging

    import gguf

    logging.getLogger("gguf").setLevel(logging.ERROR)  # SpecialVocab logs every key it sets
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(plan.pre)
    writer.add_token_list(list(plan.tokens))
    writer.add_token_types(list(plan.token_types))
    gguf.SpecialVocab(plan.folder, load_merges=True, n_vocab=len(plan.tokens)).add_to_gguf(writer, quiet=True)
