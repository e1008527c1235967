"""Text data for language models: ``.txt`` and ``.jsonl`` tokenized with the model's own tokenizer.

* ``.txt``: one example per line (blank lines skipped), no labels.
* ``.jsonl``: one JSON object per line with a ``text`` string and, on every line or
  on none, a ``label``: an integer class, or a string mapped through the model
  config's ``label2id``.

The tokenizer is the model folder's (a Hugging Face folder, or the folder holding a
PyTorch or ONNX file), or ``--set tokenizer=FOLDER``: ``transformers.AutoTokenizer``
from local files only, never the folder's own code. Every example is padded and
truncated to one length, ``--set max_length=N``; by default the 95th percentile of the
data's token lengths (numpy's ``higher`` method: a length some line has), capped by the
model's positions (``max_position_embeddings`` or the tokenizer's ``model_max_length``)
and set to the model's fixed sequence length when its input has one. How it was done
(tokenizer, length and why, padding side, lines truncated) is a note in the report.

Tokenizing happens once, in the process that loads the model: the arrays are written
as an ``.npz`` into the run's scratch folder (``Dataset.prepared``), which the
measuring processes read, so they import no tokenizer. ``compressor data`` writes the
same file where the user wants it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.plugin import (
    Context,
    Dataset,
    InvalidInputError,
    TensorSpec,
    UnsafeInputError,
    UsageError,
    first_line,
)

TEXT_SUFFIXES = (".txt", ".jsonl")
#: Any of these marks a folder holding a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
#: The default max_length is this percentile of the data's token lengths.
LENGTH_PERCENTILE = 95
#: config.json keys that state how many positions the model has, in order of preference.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")
#: A tokenizer's ``model_max_length`` past this is transformers' "unknown" placeholder.
UNKNOWN_MAX_LENGTH = 1_000_000
#: Backend options of text data (``--set``), declared by the backends that read it.
TEXT_OPTIONS_HELP = {
    "max_length": "text data: tokens per example (default: the 95th percentile of the data's token lengths, "
                  "capped by the model)",
    "tokenizer": "text data: a folder with the tokenizer (default: the model's folder)",
}
FASTTEXT_LABEL = "__label__"


@dataclass(frozen=True)
class TextExamples:
    """The examples of a text file, with their labels when the file has them."""

    texts: list[str]
    labels: list[int | str] | None
    blank_lines: int


@dataclass(frozen=True)
class Tokenized:
    """Arrays named like the model's inputs, ``y`` for the labels, and how they were made."""

    arrays: dict[str, Any]
    note: str
    facts: dict[str, Any]


def is_text(path: Path) -> bool:
    return path.suffix.lower() in TEXT_SUFFIXES


def read_examples(path: Path, limit: int | None = None) -> TextExamples:
    """The first ``limit`` examples (all with None) of a ``.txt`` or ``.jsonl`` file."""
    jsonl = path.suffix.lower() == ".jsonl"
    texts: list[str] = []
    labels: list[int | str] = []
    labelled: bool | None = None
    blank = 0
    try:
        with path.open(encoding="utf-8") as stream:
            for number, raw in enumerate(stream, 1):
                if limit is not None and len(texts) >= limit:
                    break
                line = raw.rstrip("\r\n")
                if not line.strip():
                    blank += 1
                    continue
                if not jsonl:
                    if not texts and line.lstrip().startswith(FASTTEXT_LABEL):
                        raise UsageError(
                            f"line {number} starts with {FASTTEXT_LABEL}: fastText's labelled format is "
                            "for fastText models; for a transformers model write .jsonl lines like "
                            '{"text": "...", "label": 1}', path)
                    texts.append(line)
                    continue
                text, label = _json_example(line, number, path)
                if labelled is None:
                    labelled = label is not None
                elif labelled != (label is not None):
                    raise InvalidInputError(
                        f"line {number} {'lacks' if labelled else 'has'} a label, unlike the first example: "
                        "give every line a label or none", path)
                texts.append(text)
                if label is not None:
                    labels.append(label)
    except UnicodeDecodeError as error:
        raise InvalidInputError(f"is not UTF-8 text ({first_line(error)})", path) from None
    except OSError as error:
        raise InvalidInputError(f"cannot be read ({first_line(error)})", path) from None
    if not texts:
        raise InvalidInputError("holds no examples (every line is blank)", path)
    return TextExamples(texts, labels if labelled else None, blank)


def _json_example(line: str, number: int, path: Path) -> tuple[str, int | str | None]:
    try:
        item = json.loads(line)
    except (ValueError, RecursionError) as error:
        raise InvalidInputError(f"line {number} is not JSON ({first_line(error, 80)})", path) from None
    if not isinstance(item, dict) or not isinstance(item.get("text"), str):
        raise InvalidInputError(f'line {number} is not an object with a "text" string', path)
    label = item.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int | str)):
        raise InvalidInputError(f'line {number}: "label" must be an integer or a string, not '
                                f"{type(label).__name__}", path)
    return item["text"], label


def tokenizer_folder(model_path: Path | None, options: Mapping[str, Any], data: Path) -> Path:
    """``--set tokenizer=``, else the model's folder (or the folder holding the model file)."""
    chosen = options.get("tokenizer")
    if chosen:
        folder = Path(str(chosen)).expanduser()
        if not folder.is_dir() or not _has_tokenizer(folder):
            raise UsageError(f"--set tokenizer={chosen}: not a folder with a tokenizer ({', '.join(TOKENIZER_FILES[:3])}"
                             "...)")
        return folder
    if model_path is not None:
        folder = model_path if model_path.is_dir() else model_path.parent
        if _has_tokenizer(folder):
            return folder
    raise UsageError("is text: tokenizing it needs the model's tokenizer, and the model's folder has none "
                     "(tokenizer.json, tokenizer_config.json, vocab.txt...); pass --set tokenizer=FOLDER, "
                     "or give an .npz of token arrays", data)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, local files only, never the folder's own code."""
    import transformers

    from compressor_frontends.pytorch.hf import read_json, refuse_custom_code

    config = read_json(folder, "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    if isinstance(config, dict) and config.get("auto_map"):
        raise UnsafeInputError("tokenizer_config.json maps the tokenizer to code shipped in the folder "
                               "(auto_map): compressor never runs a folder's own code", folder)
    if (folder / "config.json").is_file():
        refuse_custom_code(folder, read_json(folder, "config.json"))
    transformers.utils.logging.set_verbosity_error()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                          trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError...
        raise InvalidInputError(f"cannot load the tokenizer ({type(error).__name__}: {first_line(error)})",
                                folder) from None


def model_positions(folder: Path, tokenizer: Any) -> tuple[int | None, str]:
    """The most tokens the model takes, and where that number comes from."""
    from compressor_frontends.pytorch.hf import read_json

    found: list[tuple[int, str]] = []
    config = read_json(folder, "config.json") if (folder / "config.json").is_file() else {}
    for key in POSITION_KEYS:
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found.append((value, f"config {key}"))
            break
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < UNKNOWN_MAX_LENGTH:
        found.append((limit, "tokenizer model_max_length"))
    return min(found) if found else (None, "")


def fixed_length(inputs: Sequence[TensorSpec]) -> int | None:
    """The sequence length a model input fixes (``(None, 128)``), None when it is free."""
    for spec in inputs:
        if len(spec.shape) >= 2 and isinstance(spec.shape[1], int):
            return spec.shape[1]
    return None


def choose_max_length(lengths: Sequence[int], option: object, positions: int | None, where: str,
                      fixed: int | None) -> tuple[int, str]:
    """The length every example is padded or truncated to, and why."""
    import numpy as np

    if option is not None:
        wanted = int(option)  # type: ignore[call-overload]
        if fixed is not None and wanted != fixed:
            raise UsageError(f"--set max_length={wanted}, but the model's inputs are fixed at {fixed} tokens")
        if positions is not None and wanted > positions:
            raise UsageError(f"--set max_length={wanted} is more than the model takes ({positions}, {where})")
        return wanted, "--set max_length"
    if fixed is not None:
        return fixed, "the model's fixed sequence length"
    percentile = int(np.percentile(np.asarray(lengths), LENGTH_PERCENTILE, method="higher"))
    if positions is not None and percentile > positions:
        return positions, f"the {LENGTH_PERCENTILE}th percentile of token lengths, {percentile}, capped by {where}"
    return percentile, f"the {LENGTH_PERCENTILE}th percentile of token lengths"


def label_ids(labels: list[int | str], folder: Path, model_path: Path | None, path: Path) -> Any:
    """Integer labels as they are; strings through the model config's ``label2id``."""
    import numpy as np

    from compressor_frontends.pytorch.hf import read_json

    if all(isinstance(label, int) for label in labels):
        return np.asarray(labels, dtype=np.int64)
    config_folder = model_path if model_path is not None and model_path.is_dir() else folder
    config = read_json(config_folder, "config.json") if (config_folder / "config.json").is_file() else {}
    mapping = config.get("label2id") if isinstance(config, dict) else None
    if not isinstance(mapping, dict) or not mapping:
        raise InvalidInputError("has string labels, but the model's config.json has no label2id to map them; "
                                "use integer labels", path)
    ids = []
    for label in labels:
        value = mapping.get(label) if isinstance(label, str) else label
        if not isinstance(value, int):
            known = ", ".join(sorted(str(key) for key in mapping)[:10])
            raise InvalidInputError(f"label {label!r} is not in the model's label2id ({known})", path)
        ids.append(value)
    return np.asarray(ids, dtype=np.int64)


def tokenize(examples: TextExamples, inputs: Sequence[TensorSpec], model_path: Path | None,
             options: Mapping[str, Any], path: Path) -> Tokenized:
    """The examples as token arrays for ``inputs`` (every input the tokenizer makes when the
    model names none), with labels in ``y``."""
    import numpy as np

    folder = tokenizer_folder(model_path, options, path)
    tokenizer = load_tokenizer(folder)
    padded_with = ""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InvalidInputError("the tokenizer has no padding or end token to pad examples with", folder)
        tokenizer.pad_token = tokenizer.eos_token
        padded_with = f" with the end token {tokenizer.eos_token!r} (the tokenizer has no padding token)"
    try:
        lengths = [len(ids) for ids in tokenizer(examples.texts, truncation=False)["input_ids"]]
        positions, where = model_positions(folder, tokenizer)
        length, why = choose_max_length(lengths, options.get("max_length"), positions, where,
                                        fixed_length(inputs))
        encoded = tokenizer(examples.texts, padding="max_length", truncation=True, max_length=length,
                            return_tensors="np")
    except (UsageError, InvalidInputError):
        raise
    except Exception as error:  # noqa: BLE001 - tokenizers raise ValueError, TypeError, their own errors
        raise InvalidInputError(f"cannot be tokenized ({type(error).__name__}: {first_line(error)})", path) from None
    arrays: dict[str, Any] = {}
    made = dict(encoded)
    for spec in inputs or tuple(TensorSpec(name, (None, None), "int64") for name in made):
        if spec.name not in made:
            if spec.optional:
                continue
            raise InvalidInputError(f"the tokenizer makes {', '.join(made)}, not the model's input "
                                    f"{spec.name!r}", folder)
        dtype = spec.dtype if spec.dtype.startswith(("int", "uint")) else "int64"
        arrays[spec.name] = np.ascontiguousarray(made[spec.name], dtype=dtype)
    if examples.labels is not None:
        arrays["y"] = label_ids(examples.labels, folder, model_path, path)
    truncated = sum(1 for count in lengths if count > length)
    side = str(getattr(tokenizer, "padding_side", "right"))
    facts = {"tokenizer": type(tokenizer).__name__, "tokenizer_folder": str(folder), "max_length": length,
             "max_length_reason": why, "padding_side": side, "truncated": truncated,
             "examples": len(examples.texts), "longest": max(lengths)}
    blank = f", {examples.blank_lines} blank line(s) skipped" if examples.blank_lines else ""
    note = (f"{path.name}: {len(examples.texts)} example(s) tokenized by the model's {facts['tokenizer']} "
            f"({folder.name}), max_length {length} ({why}), padded on the {side}{padded_with}; "
            f"{truncated} truncated (longest {max(lengths)} tokens){blank}")
    return Tokenized(arrays, note, facts)


def prepared_path(workdir: Path, purpose: str, path: Path) -> Path:
    """Where a run keeps the tokenized ``.npz`` of ``path`` for ``purpose``."""
    folder = workdir / "text-data"
    folder.mkdir(exist_ok=True)
    return folder / f"{purpose}-{path.stem}.npz"


def text_dataset(path: Path, purpose: str, inputs: tuple[TensorSpec, ...], limit: int | None,
                 model_path: Path | None, context: Context | None) -> Dataset | None:
    """``compressor_load_data`` for text: None for other files. The tokenized arrays are saved
    in the run's workdir (``Dataset.prepared``) for the measuring processes."""
    import numpy as np

    if not is_text(path):
        return None
    options = context.options if context is not None else {}
    tokenized = tokenize(read_examples(path, limit), inputs, model_path, options, path)
    arrays = tokenized.arrays
    features = {name: array for name, array in arrays.items() if name != "y"}
    size = len(next(iter(features.values())))
    prepared = None
    if context is not None and context.workdir is not None:
        prepared = prepared_path(context.workdir, purpose, path)
        np.savez(prepared, **arrays)
    return Dataset(path=path, features=features, labels=arrays.get("y"), size=size, notes=[tokenized.note],
                   prepared=prepared)
