"""SentencePiece tokenizers as llama.cpp's ``llama`` tokenizer model (tokens, scores, types).

Two sources, tried in the order llama.cpp's ``LlamaModel.set_vocab`` tries them:

* ``tokenizer.model`` (Llama 2, Mistral 7B v0.1, TinyLlama): :func:`sentencepiece_vocab`
  is ``_create_vocab_sentencepiece``: every piece with its score and type (normal, unknown,
  control, unused, byte), ids up to the config's ``vocab_size`` padded as ``[PADn]`` (unused,
  score -10000), then ``added_tokens.json`` and tokenizer_config.json's
  ``added_tokens_decoder`` over them (control when special or special-looking, else
  user-defined with ``▁`` as a space; score -1000).
* ``tokenizer.json`` alone, with the byte-fallback BPE model transformers converts SentencePiece
  into (``_set_vocab_llama_hf``): :func:`llama_hf_vocab`. llama.cpp's ``LlamaHfVocab`` scores
  every token -1000, which makes its tokenizer merge left to right instead of by the
  tokenizer's ranks; here a token made by a merge scores minus the merge's rank, so llama.cpp
  merges in the order the Hugging Face tokenizer does (the scores a SentencePiece BPE model has,
  up to a shift).

Both write ``tokenizer.ggml.pre`` = ``default`` and read the special ids and the add-bos/eos
flags with ``gguf.SpecialVocab`` (:func:`compressor_gguf.vocab.write_vocab`), as llama.cpp does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from compressor.plugin import InvalidInputError, UnsupportedError, first_line

#: SentencePiece token types, the same numbers as gguf.TokenType.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PAD_SCORE, ADDED_SCORE = -10000.0, -1000.0
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

Vocab = tuple[list[str], list[float], list[int]]


def looks_special(token: str) -> bool:
    """llama.cpp's ``does_token_look_special``: added tokens some models forget to mark special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _json_file(folder: Path, name: str) -> Any:
    path = folder / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise InvalidInputError(f"has an unreadable {name} ({first_line(error)})", folder) from None


def load_sentencepiece(folder: Path) -> Any | None:
    """The folder's ``tokenizer.model`` as a SentencePieceProcessor; None when it has none or
    the file is no SentencePiece model (Llama 3's tiktoken file, say)."""
    path = folder / "tokenizer.model"
    if not path.is_file():
        return None
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise UnsupportedError("has a SentencePiece tokenizer.model; reading it needs the sentencepiece package "
                               "(pip install sentencepiece, part of compressor[gguf])", folder) from None
    processor = SentencePieceProcessor()
    try:
        processor.LoadFromFile(str(path))
    except (OSError, RuntimeError):
        return None
    return processor


def sentencepiece_vocab(folder: Path, processor: Any, vocab_size: int) -> Vocab:
    """``_create_vocab_sentencepiece``: pieces, scores and types for ids ``0 .. vocab_size - 1``."""
    pieces = processor.vocab_size()
    if pieces > vocab_size:
        raise InvalidInputError(f"has a tokenizer.model of {pieces} pieces, past the model's vocab_size "
                                f"{vocab_size}", folder)
    tokens = [f"[PAD{index}]" for index in range(vocab_size)]
    scores = [PAD_SCORE] * vocab_size
    types = [UNUSED] * vocab_size
    for index in range(pieces):
        tokens[index] = processor.IdToPiece(index)
        scores[index] = float(processor.GetScore(index))
        types[index] = (UNKNOWN if processor.IsUnknown(index) else CONTROL if processor.IsControl(index)
                        else UNUSED if processor.IsUnused(index) else BYTE if processor.IsByte(index) else NORMAL)
    added = _json_file(folder, "added_tokens.json")
    for token, index in (added.items() if isinstance(added, dict) else ()):
        if isinstance(index, int) and 0 <= index < vocab_size:  # llama.cpp skips ids past vocab_size too
            tokens[index], scores[index], types[index] = str(token), ADDED_SCORE, USER_DEFINED
    config = _json_file(folder, "tokenizer_config.json")
    decoder = config.get("added_tokens_decoder") if isinstance(config, dict) else None
    for key, entry in (decoder.items() if isinstance(decoder, dict) else ()):
        if not (str(key).isdigit() and isinstance(entry, dict) and isinstance(entry.get("content"), str)):
            continue
        index, token = int(key), entry["content"]
        if index >= vocab_size:
            continue
        if entry.get("special") or looks_special(token):
            types[index] = CONTROL
        else:
            token, types[index] = token.replace("\u2581", " "), USER_DEFINED
        tokens[index], scores[index] = token, ADDED_SCORE
    return tokens, scores, types


def is_llama_hf(model: dict[str, Any], tokenizer: dict[str, Any]) -> bool:
    """``LlamaHfVocab``'s test: a byte-fallback BPE with a Sequence decoder (converted SentencePiece)."""
    decoder = tokenizer.get("decoder")
    return (model.get("type") == "BPE" and bool(model.get("byte_fallback"))
            and isinstance(decoder, dict) and decoder.get("type") == "Sequence")


def _merge_pairs(folder: Path, merges: Any) -> list[str]:
    """The merged tokens in rank order; merges are ``"a b"`` strings or ``[a, b]`` pairs."""
    if not isinstance(merges, list):
        raise InvalidInputError("has a tokenizer.json BPE model whose merges are not a list", folder)
    merged = []
    for merge in merges:
        if isinstance(merge, str) and merge.count(" ") == 1:
            merged.append(merge.replace(" ", ""))
        elif isinstance(merge, list) and len(merge) == 2 and all(isinstance(part, str) for part in merge):
            merged.append(merge[0] + merge[1])
        else:
            raise InvalidInputError(f"has a tokenizer.json merge {str(merge)[:40]!r} that is not a pair", folder)
    return merged


def llama_hf_vocab(folder: Path, tokenizer: dict[str, Any], vocab_size: int) -> Vocab:
    """Tokens, scores and types of a tokenizer.json byte-fallback BPE (see the module's doc)."""
    model = tokenizer["model"]
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise InvalidInputError("has a tokenizer.json BPE model without a vocab", folder)
    merged = _merge_pairs(folder, model.get("merges") or [])
    rank: dict[str, int] = {}
    for index, token in enumerate(merged):
        rank.setdefault(token, index)
    unmerged_score = -float(len(merged) + 1)  # below every merge: llama.cpp joins such pairs last
    reverse: dict[int, str] = {int(index): str(token) for token, index in vocab.items()}
    kinds = {int(added["id"]): CONTROL if added.get("special") else USER_DEFINED
             for added in tokenizer.get("added_tokens") or [] if isinstance(added, dict) and "id" in added}
    for added in tokenizer.get("added_tokens") or []:
        if isinstance(added, dict) and "id" in added:
            reverse[int(added["id"])] = str(added.get("content"))
    largest = max(reverse, default=-1)
    if largest >= vocab_size:
        raise InvalidInputError(f"has a tokenizer with id {largest}, past the model's vocab_size {vocab_size}",
                                folder)
    unknown = model.get("unk_token") or _config_token(folder, "unk_token")
    tokens = [f"[PAD{index}]" for index in range(vocab_size)]
    scores = [PAD_SCORE] * vocab_size
    types = [UNUSED] * vocab_size
    for index, token in reverse.items():
        tokens[index] = token
        if token == unknown:
            types[index], scores[index] = UNKNOWN, 0.0
        elif index in kinds:
            types[index], scores[index] = kinds[index], ADDED_SCORE
        elif BYTE_TOKEN.fullmatch(token):
            types[index], scores[index] = BYTE, 0.0
        else:
            types[index], scores[index] = NORMAL, -float(rank[token]) if token in rank else unmerged_score
    return tokens, scores, types


def _config_token(folder: Path, key: str) -> str | None:
    """A special token named in tokenizer_config.json (transformers 5 leaves the BPE model's unk_token unset)."""
    config = _json_file(folder, "tokenizer_config.json")
    entry = config.get(key) if isinstance(config, dict) else None
    entry = entry.get("content") if isinstance(entry, dict) else entry
    return entry if isinstance(entry, str) else None


def add_space_prefix(folder: Path) -> bool | None:
    """tokenizer_config.json's ``add_prefix_space``, which llama.cpp writes when it is set."""
    config = _json_file(folder, "tokenizer_config.json")
    value = config.get("add_prefix_space") if isinstance(config, dict) else None
    return value if isinstance(value, bool) else None
