"""A Hugging Face folder's tokenizer as GGUF metadata (``tokenizer.ggml.*``), chosen as llama.cpp's
``convert_hf_to_gguf.py`` chooses it.

For ``llama``/``mistral`` (``LlamaModel.set_vocab``): a SentencePiece ``tokenizer.model`` first,
then a tokenizer.json byte-fallback BPE converted from SentencePiece, both written as llama.cpp's
``llama`` tokenizer with scores and token types (:mod:`compressor_gguf.spm_vocab`); then a
byte-level BPE. ``qwen2`` and ``qwen3`` (``Qwen2Model.set_vocab``, which Qwen3Model inherits):
``tokenizer.model``, then byte-level BPE. ``phi3``: ``tokenizer.model`` (Phi-3, Phi-3.5), then
byte-level BPE (Phi-4-mini's).
``gpt2``: byte-level BPE only.

Byte-level BPE (``tokenizer.json`` with a BPE model and a ByteLevel decoder: GPT-2, Llama 3,
Qwen2, Mistral's Tekken-in-tokenizer.json...) is written as llama.cpp's ``gpt2`` tokenizer
(``_set_vocab_gpt2``): every id up to the config's ``vocab_size`` (ids the tokenizer lacks as
``[PADn]``, unused), added tokens as control (special) or user-defined tokens, the merges, and
the special ids. Other tokenizers (WordPiece, Unigram, a byte-fallback BPE for an architecture
whose llama.cpp converter does not read it) are refused before any work.

``tokenizer.ggml.pre`` (how llama.cpp splits text before BPE) is found as llama.cpp finds it:
the hash of the tokenizer's ids for a check text (:mod:`compressor_gguf.pretokenizers`).
A tokenizer llama.cpp does not know gets ``default``, said in a note: compressor feeds token
ids, so measurements are unaffected, but llama.cpp tokenizing raw text may split it
differently from the original tokenizer. SentencePiece tokenizers are ``default``, as in llama.cpp.
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
#: The llama.cpp architectures whose converter reads a SentencePiece tokenizer.model first.
SENTENCEPIECE_ARCHS = ("llama", "qwen2", "qwen3", "phi3")


@dataclass(frozen=True)
class VocabPlan:
    """What the tokenizer adds to the GGUF file: llama.cpp's names and the token lists."""

    folder: Path
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    pre: str
    pre_known: bool
    model: str = "gpt2"  # llama.cpp's tokenizer model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    scores: tuple[float, ...] | None = None
    add_space_prefix: bool | None = None
    source: str = "tokenizer.json"  # the file the tokens come from
    arch: str = "gpt2"  # llama.cpp's architecture, for LlamaModel.set_vocab's special cases


def read_tokenizer_json(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UnsupportedError("has no tokenizer.json (nor, for Llama, Mistral and Qwen2, a SentencePiece "
                               "tokenizer.model): llama.cpp needs the tokenizer in the GGUF file", folder)
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


def plan_vocab(folder: Path, vocab_size: int, arch: str = "gpt2") -> VocabPlan:
    """The tokens for ids ``0 .. vocab_size - 1``, from the file llama.cpp's converter for ``arch``
    reads; refuses tokenizers it cannot take."""
    from compressor_gguf import spm_vocab

    if arch in SENTENCEPIECE_ARCHS:
        processor = spm_vocab.load_sentencepiece(folder)
        if processor is not None:
            tokens, scores, types = spm_vocab.sentencepiece_vocab(folder, processor, vocab_size)
            return VocabPlan(folder, tuple(tokens), tuple(types), "default", True, "llama", tuple(scores),
                             _space_prefix(folder, arch), "tokenizer.model", arch)
    if arch in SENTENCEPIECE_ARCHS and (folder / "tokenizer.model").is_file() and not (
            folder / "tokenizer.json").is_file():
        raise InvalidInputError("has a tokenizer.model that sentencepiece cannot read, and no tokenizer.json", folder)
    tokenizer = read_tokenizer_json(folder)
    model = tokenizer["model"]
    if arch == "llama" and spm_vocab.is_llama_hf(model, tokenizer):
        tokens, scores, types = spm_vocab.llama_hf_vocab(folder, tokenizer, vocab_size)
        return VocabPlan(folder, tuple(tokens), tuple(types), "default", True, "llama", tuple(scores),
                         _space_prefix(folder, arch), arch=arch)
    byte_level = "ByteLevel" in _names(tokenizer.get("decoder")) or "ByteLevel" in _names(
        tokenizer.get("pre_tokenizer"))
    if model.get("type") != "BPE" or model.get("byte_fallback") or not byte_level:
        kind = f"{model.get('type')}{' with byte fallback (SentencePiece)' if model.get('byte_fallback') else ''}"
        written = ("byte-level BPE, SentencePiece (tokenizer.model) or its byte-fallback BPE tokenizer.json"
                   if arch == "llama" else "byte-level BPE or a SentencePiece tokenizer.model"
                   if arch in SENTENCEPIECE_ARCHS else "byte-level BPE (GPT-2 style)")
        raise UnsupportedError(f"has a {kind} tokenizer.json; llama.cpp's {arch} converter writes "
                               f"{written} tokenizers only", folder)
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
    pre, known_pre = pre_tokenizer(folder)
    return VocabPlan(folder, tokens, types, pre, known_pre, add_space_prefix=_space_prefix(folder, arch), arch=arch)


def _space_prefix(folder: Path, arch: str) -> bool | None:
    """``LlamaModel.set_vocab`` writes tokenizer_config.json's ``add_prefix_space``; the others do not."""
    from compressor_gguf.spm_vocab import add_space_prefix

    return add_space_prefix(folder) if arch == "llama" else None


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
    """Add the tokenizer's keys to a ``gguf.GGUFWriter``: model, pre-tokenizer, tokens (scores), merges, ids."""
    import logging

    import gguf

    logging.getLogger("gguf").setLevel(logging.ERROR)  # SpecialVocab logs every key it sets
    if plan.add_space_prefix is not None:
        writer.add_add_space_prefix(plan.add_space_prefix)
    writer.add_tokenizer_model(plan.model)
    writer.add_tokenizer_pre(plan.pre)
    writer.add_token_list(list(plan.tokens))
    if plan.scores is not None:
        writer.add_token_scores(list(plan.scores))
    writer.add_token_types(list(plan.token_types))
    merges = plan.model == "gpt2"  # the llama model merges by score
    special = gguf.SpecialVocab(plan.folder, load_merges=merges, n_vocab=len(plan.tokens))
    if plan.arch == "llama" and len(plan.tokens) == 32016:  # CodeLlama: its end of infill (LlamaModel.set_vocab)
        special._set_special_token("eot", 32010)
    if plan.arch == "llama" and len(plan.tokens) == 49152:  # Granite's small models add no BOS (the same)
        special.add_special_token["bos"] = False
    special.add_to_gguf(writer, quiet=True)
