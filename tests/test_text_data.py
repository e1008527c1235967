"""Text in for language models: ``.txt`` and ``.jsonl`` tokenized with the model folder's own
tokenizer, to one length (the 95th percentile of the data's token lengths by default), with
how it was done in the report; ``compressor data`` writes the same arrays as an ``.npz``."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from compressor import Context
from compressor.cli import cli

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "fast", "slow", "big", "small", "red", "blue",
         "house", "tree", "is", "was", "and", "bird", "fish", "under", "over", "near", "far"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LABELS = ("neg", "neu", "pos")
POSITIONS = 40


def _vocab() -> dict[str, int]:
    return {token: index for index, token in enumerate([*SPECIAL, *WORDS])}


def make_folder(folder: Path, classifier: bool = False) -> Path:
    """A two-layer BERT (or a 3-class classifier) saved like a Hugging Face folder, with a
    WordPiece tokenizer made from a vocabulary written here: no downloads."""
    import torch
    import transformers

    folder.mkdir(parents=True)
    transformers.BertTokenizer(vocab=_vocab()).save_pretrained(folder)
    torch.manual_seed(0)
    settings: dict[str, Any] = dict(vocab_size=len(_vocab()), hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64,
                                    max_position_embeddings=POSITIONS)
    if classifier:
        settings.update(num_labels=3, id2label=dict(enumerate(LABELS)),
                        label2id={name: index for index, name in enumerate(LABELS)})
        model = transformers.BertForSequenceClassification(transformers.BertConfig(**settings))
    else:
        model = transformers.BertModel(transformers.BertConfig(**settings))
    model.eval().save_pretrained(folder, safe_serialization=True)
    return folder


def sentences(count: int, seed: int = 0, longest: int = 14) -> list[str]:
    """Sentences of 2 to ``longest`` words, plus two far longer ones (past the 95th percentile)."""
    pick = random.Random(seed)
    lines = [" ".join(pick.choice(WORDS) for _ in range(pick.randint(2, longest))) for _ in range(count - 2)]
    return [*lines[:5], " ".join(WORDS), *lines[5:], " ".join(WORDS[::-1] * 2)]


def token_lengths(folder: Path, texts: list[str]) -> list[int]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return [len(ids) for ids in tokenizer(texts)["input_ids"]]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("text")
    folder = make_folder(root / "bert")
    texts = sentences(40)
    text_file = root / "sentences.txt"
    text_file.write_text("\n".join(texts[:20]) + "\n\n" + "\n".join(texts[20:]) + "\n", encoding="utf-8")
    lengths = token_lengths(folder, texts)
    expected = int(np.percentile(lengths, 95, method="higher"))
    return {"folder": folder, "text": text_file, "texts": texts, "lengths": lengths, "max_length": expected}


def _load_data(model: Path, data: Path, backend: str, workdir: Path, **options: Any) -> Any:
    """The model loaded and the data read as a run reads them (core's dispatch, the backend's hook)."""
    from compressor.plugins import get_host
    from compressor.runner import load_data, load_model
    from compressor.validation import apply_settings

    host = get_host()
    chosen = host.backend(backend)
    _, defaults = apply_settings(chosen, [], {})
    context = Context(options={**defaults, **options}, workdir=workdir)
    loaded = load_model(host, chosen, model, context)
    return load_data(host, chosen, data, "eval", loaded, None, context)


def test_a_txt_file_is_tokenized_to_the_95th_percentile_length(encoder: dict[str, Any], tmp_path: Path) -> None:
    import transformers

    dataset = _load_data(encoder["folder"], encoder["text"], "onnx", tmp_path)
    length = encoder["max_length"]
    assert length < max(encoder["lengths"])  # the two long lines are cut
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(encoder["folder"]), local_files_only=True)
    want = tokenizer(encoder["texts"], padding="max_length", truncation=True, max_length=length,
                     return_tensors="np")
    assert set(dataset.features) == {"input_ids", "attention_mask", "token_type_ids"}
    for name, array in dataset.features.items():
        assert array.dtype == np.int64 and array.shape == (40, length)
        np.testing.assert_array_equal(array, want[name])
    assert dataset.labels is None and dataset.size == 40
    truncated = sum(count > length for count in encoder["lengths"])
    assert truncated >= 1
    (note,) = dataset.notes
    assert (f"max_length {length} (the 95th percentile of token lengths)" in note
            and "padded on the right" in note and f"{truncated} truncated" in note
            and "1 blank line(s) skipped" in note and "BertTokenizer" in note), note
    # The measuring processes read the same arrays from the run's workdir.
    prepared = dict(np.load(dataset.prepared))
    assert dataset.prepared.parent.parent == tmp_path and set(prepared) == set(dataset.features)
    for name, array in dataset.features.items():
        np.testing.assert_array_equal(prepared[name], array)


def test_max_length_is_capped_by_the_model_and_settable(encoder: dict[str, Any], tmp_path: Path) -> None:
    from compressor import UsageError

    folder = encoder["folder"]
    dataset = _load_data(folder, encoder["text"], "onnx", tmp_path, max_length=6)
    assert dataset.features["input_ids"].shape == (40, 6) and "max_length 6 (--set max_length)" in dataset.notes[0]
    long_file = tmp_path / "long.txt"
    long_file.write_text("\n".join([" ".join(WORDS * 3)] * 4) + "\n", encoding="utf-8")
    capped = _load_data(folder, long_file, "onnx", tmp_path)
    assert capped.features["input_ids"].shape == (4, POSITIONS)
    assert "capped by config max_position_embeddings" in capped.notes[0] and "4 truncated" in capped.notes[0]
    with pytest.raises(UsageError, match="more than the model takes"):
        _load_data(folder, encoder["text"], "onnx", tmp_path, max_length=POSITIONS + 1)


def test_run_on_a_txt_file_measures_the_tokenized_sentences(encoder: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(encoder["folder"]), "-q", "dynamic", "--data", str(encoder["text"]),
                                      "-o", str(out), "--min-seconds", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    original, dynamic = report["variants"]
    assert any(f"max_length {encoder['max_length']} (the 95th percentile" in note for note in original["notes"])
    assert dynamic["error"] is None
    hidden = dynamic["metrics"]["outputs"]["last_hidden_state"]
    assert hidden["cosine"]["mean"] > 0.99, hidden
    assert "sentences.txt" in (out / "report.md").read_text()


def test_jsonl_labels_are_mapped_through_label2id_and_scored(tmp_path: Path) -> None:
    import torch
    import transformers

    folder = make_folder(tmp_path / "classifier", classifier=True)
    texts = sentences(30, seed=1)
    pick = random.Random(2)
    labels = [pick.choice(LABELS) for _ in texts]
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in zip(texts, labels)),
                    encoding="utf-8")
    (tmp_path / "work").mkdir()
    dataset = _load_data(folder, data, "torch", tmp_path / "work")
    np.testing.assert_array_equal(dataset.labels, [LABELS.index(label) for label in labels])
    model = transformers.BertForSequenceClassification.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.no_grad():
        logits = model(**{name: torch.from_numpy(array) for name, array in dataset.features.items()}).logits
    accuracy = float((logits.argmax(1).numpy() == dataset.labels).mean())
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["measure", str(folder), "--data", str(data),
                                      "-o", str(out), "--min-seconds", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    (original,) = json.loads((out / "report.json").read_text())["variants"]
    assert original["metrics"]["accuracy"] == pytest.approx(accuracy)
    assert any("labelled.jsonl: 30 example(s) tokenized" in note for note in original["notes"])


def test_compressor_data_writes_the_arrays_a_run_reads(encoder: dict[str, Any], tmp_path: Path) -> None:
    target = tmp_path / "sentences.npz"
    args = ["data", str(encoder["folder"]), str(encoder["text"]), "-o", str(target), "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"max_length {encoder['max_length']}" in result.output and "wrote" in result.output
    written = dict(np.load(target))
    (tmp_path / "work").mkdir()
    read = _load_data(encoder["folder"], encoder["text"], "onnx", tmp_path / "work")
    assert set(written) == set(read.features)
    for name, array in read.features.items():
        np.testing.assert_array_equal(written[name], array)
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 2 and "--force" in again.stderr
    assert dict(np.load(target)).keys() == written.keys()


@pytest.mark.parametrize("case", ["no tokenizer", "fasttext format", "unknown label", "mixed labels", "not json"])
def test_text_mistakes_are_one_line_before_any_work(encoder: dict[str, Any], tmp_path: Path, case: str) -> None:
    import shutil

    model, data = encoder["folder"], tmp_path / "data.jsonl"
    if case == "no tokenizer":
        model = tmp_path / "bare"
        model.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(encoder["folder"] / name, model / name)
        data = encoder["text"]
    elif case == "fasttext format":
        data = tmp_path / "train.txt"
        data.write_text("__label__pos the cat sat\n__label__neg a dog ran\n", encoding="utf-8")
    elif case == "unknown label":
        data.write_text(json.dumps({"text": "the cat", "label": "maybe"}) + "\n", encoding="utf-8")
    elif case == "mixed labels":
        data.write_text(json.dumps({"text": "the cat", "label": 1}) + "\n" + json.dumps({"text": "a dog"}) + "\n",
                        encoding="utf-8")
    else:
        data.write_text('{"text": "the cat"\n', encoding="utf-8")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(model), "-q", "dynamic", "--data", str(data), "-o", str(out),
                                      "--quiet"])
    expected = {"no tokenizer": 2, "fasttext format": 2}.get(case, 4)
    assert result.exit_code == expected, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and data.name in lines[0], lines
    assert not out.exists()


def test_fasttext_text_stays_fasttext_on_its_backend(tmp_path: Path) -> None:
    """The hook dispatch is per backend: fastText's labelled .txt never reaches a tokenizer."""
    from compressor.plugins import get_host

    data = tmp_path / "train.txt"
    data.write_text("__label__pos the cat sat\n__label__neg a dog ran\n", encoding="utf-8")
    dataset = get_host().hook_for("fasttext", "compressor_load_data")(
        path=data, purpose="eval", inputs=(), backend="fasttext", limit=None, model_path=tmp_path / "m.bin",
        context=Context(workdir=tmp_path))
    assert dataset.prepared is None and dataset.size == 2
    assert dataset.features == [["the", "cat", "sat"], ["a", "dog", "ran"]] or "the cat sat" in str(dataset.features)


def test_a_pt2_program_beside_a_tokenizer_takes_text(encoder: dict[str, Any], tmp_path: Path) -> None:
    """A PyTorch model with a tokenizer in its folder: the arrays are the program's inputs only."""
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = torch.nn.Embedding(len(_vocab()), 8)

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            mask = attention_mask.unsqueeze(-1).float()
            return (self.embedding(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)

    folder = tmp_path / "pooled"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((encoder["folder"] / name).read_bytes())
    ids = torch.ones(2, 5, dtype=torch.int64)
    dims = {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
    program = torch.export.export(Pooled().eval(), (ids, torch.ones_like(ids)), dynamic_shapes=(dims, dims))
    torch.export.save(program, str(folder / "pooled.pt2"))
    (tmp_path / "work").mkdir()
    dataset = _load_data(folder / "pooled.pt2", encoder["text"], "torch", tmp_path / "work")
    assert list(dataset.features) == ["input_ids", "attention_mask"]
    assert dataset.features["input_ids"].shape == (40, encoder["max_length"])
