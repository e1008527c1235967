"""The fasttext backend through its hooks: header checks, data, pq, measurement."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import numpy as np
import pytest
from fasttext_fixtures import (
    BUCKET_OFFSET,
    DICTIONARY_OFFSET,
    FastTextFiles,
    input_matrix_offset,
    patched,
)

from compressor import (
    Artifact,
    CompressionError,
    Context,
    Dataset,
    InvalidInputError,
    MeasureSettings,
    Step,
    Stopwatch,
    UnsupportedError,
    UsageError,
)
from compressor.engine import RuntimeMeasurement, measure_runtime
from compressor.plugins import PluginHost
from compressor_fasttext import plugin
from compressor_fasttext.data import LabelLists, read_labelled_text, texts_of
from compressor_fasttext.header import read_layout
from compressor_fasttext.loading import probe_in_child
from compressor_fasttext.metrics import labels_changed_most

#: The session fixture ``ft`` (small trained models) lives in fasttext_fixtures.
pytest_plugins = ("fasttext_fixtures",)


def quick_settings(**options: object) -> MeasureSettings:
    return MeasureSettings(warmup=1, min_iterations=3, min_seconds=0.0, options=options)


def test_backend_declares_pq_only_with_its_parameters() -> None:
    backend = PluginHost().backend("fasttext")
    assert list(backend.techniques) == ["pq"]
    pq = backend.techniques["pq"]
    assert set(pq.params) == {"dsub", "qnorm", "qout", "cutoff", "retrain", "epoch", "lr", "thread"}
    assert pq.requires_data == {"retrain": "train"}
    assert backend.options["k"].default == 1
    assert (backend.extra, backend.requires, backend.distributions) == (
        "fasttext", ("fasttext",), ("fasttext-numpy2",)
    )
    assert backend.is_installed()


def test_identify_by_suffix_or_magic(ft: FastTextFiles, tmp_path: Path) -> None:
    renamed = tmp_path / "classifier.model"
    renamed.write_bytes(ft.model.read_bytes())
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert plugin.compressor_identify(ft.model) == "fasttext"
    assert plugin.compressor_identify(ft.quantized) == "fasttext"
    assert plugin.compressor_identify(renamed) == "fasttext"
    assert plugin.compressor_identify(text) is None
    # Another format's suffix is left to its backend, which reports the lie.
    liar = tmp_path / "classifier.tflite"
    liar.write_bytes(ft.model.read_bytes())
    assert plugin.compressor_identify(liar) is None


def test_layout_matches_what_fasttext_loads(ft: FastTextFiles) -> None:
    import fasttext

    dense, quantized = read_layout(ft.model), read_layout(ft.quantized)
    model = fasttext.load_model(str(ft.model))
    assert (dense.model, dense.loss, dense.dim, dense.bucket) == ("supervised", "softmax", 16, 4000)
    assert dense.words == len(model.words) and dense.labels == len(model.labels) == 6
    assert (dense.input.rows, dense.input.cols) == model.get_input_matrix().shape
    assert (dense.output.rows, dense.output.cols) == model.get_output_matrix().shape
    assert not dense.quantized and dense.pruned_ngrams == -1
    assert quantized.quantized and quantized.input.qnorm and quantized.input.dsub == 2
    assert quantized.input.rows == 1000 == quantized.words + quantized.pruned_ngrams
    assert read_layout(ft.vectors).model == "cbow"


def test_every_truncation_is_refused(ft: FastTextFiles) -> None:
    for source in (ft.quantized, ft.model):
        data = source.read_bytes()
        cuts = [*range(0, 2000, 7), *range(2000, len(data), 997), len(data) - 1]
        for cut in cuts:
            truncated = source.with_name(f"cut-{source.suffix[1:]}")
            truncated.write_bytes(data[:cut])
            with pytest.raises(InvalidInputError) as caught:
                read_layout(truncated)
            assert caught.value.path == truncated


def test_trailing_bytes_are_refused(ft: FastTextFiles, tmp_path: Path) -> None:
    padded = tmp_path / "padded.bin"
    padded.write_bytes(ft.model.read_bytes() + b"\0" * 4)
    with pytest.raises(InvalidInputError, match="unexpected bytes"):
        read_layout(padded)


@pytest.mark.parametrize(
    ("name", "where", "fmt", "values", "message"),
    [
        ("rows", "matrix", "<qq", (2**40, 16), "declared"),
        ("cols", "matrix", "<qq", (4331, 2**40), "declared"),
        ("dim", "dim", "<i", (2**30,), "declared"),
        ("dictionary", "dictionary", "<iii", (2**31 - 1, 5, 6), "do not add up"),
        ("entries", "dictionary", "<iii", (2**30 + 6, 2**30, 6), "entries"),
    ],
)
def test_enormous_declared_sizes_are_refused_without_allocating(
    ft: FastTextFiles, tmp_path: Path, name: str, where: str, fmt: str, values: tuple[int, ...],
    message: str,
) -> None:
    offset = {"matrix": input_matrix_offset(ft.model), "dim": 8, "dictionary": DICTIONARY_OFFSET}[where]
    bad = patched(ft.model, tmp_path / f"{name}.bin", offset, fmt, *values)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InvalidInputError, match=message):
        plugin.compressor_load(bad, "fasttext", Context())
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KiB


def test_a_fasttext_crash_while_loading_becomes_an_error(ft: FastTextFiles, tmp_path: Path) -> None:
    # No buckets but character n-grams: fastText divides by zero building subwords.
    crashing = patched(ft.vectors, tmp_path / "crash.bin", BUCKET_OFFSET, "<i", 0)
    with pytest.raises(InvalidInputError, match="bucket is 0"):
        read_layout(crashing)
    with pytest.raises(InvalidInputError, match="crashed while loading it"):
        probe_in_child(crashing)


def test_reads_labelled_text(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("__label__a __label__b first  line\n\n  \nsecond __label__c\tline\nno label\n")
    data = plugin.compressor_load_data(path, "eval", (), "fasttext", None)
    assert texts_of(data) == ["first line", "second line", "no label"]
    assert data.labels == [["__label__a", "__label__b"], ["__label__c"], []]
    assert isinstance(data.labels[:2], LabelLists)
    assert np.asarray(data.labels[:2]).tolist() == ["__label__a __label__b", "__label__c"]
    assert plugin.compressor_load_data(tmp_path / "x.npz", "eval", (), "fasttext", None) is None


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty"), (b"\n \n", "empty"), (b"just text\n", "no line carries"), (b"__label__a \xff\n", "not UTF-8")],
)
def test_bad_data_files_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(InvalidInputError, match=message) as caught:
        read_labelled_text(path)
    assert caught.value.path == path


def test_only_the_examples_asked_for_are_read(tmp_path: Path) -> None:
    """--max-examples 3 stops after three examples: a bad line further down is never read."""
    path = tmp_path / "data.txt"
    path.write_bytes(b"\n".join([b"__label__a one", b"", b"__label__b two", b"__label__a three",
                                  b"__label__b \xff"]) + b"\n")
    data = plugin.compressor_load_data(path, "eval", (), "fasttext", 3)
    assert texts_of(data) == ["one", "two", "three"] and data.size == 3
    with pytest.raises(InvalidInputError, match="line 5 is not UTF-8"):
        read_labelled_text(path)


def test_a_line_over_the_cap_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    from compressor_fasttext.data import MAX_LINE_BYTES

    path = tmp_path / "data.txt"
    path.write_bytes(b"__label__a " + b"w" * (MAX_LINE_BYTES - 11) + b"\n__label__b " + b"x" * MAX_LINE_BYTES)
    assert read_labelled_text(path, 1).size == 1
    with pytest.raises(InvalidInputError, match=r"line 2 is longer than 1,048,576 bytes") as caught:
        read_labelled_text(path)
    assert caught.value.path == path


def test_pq_with_cutoff_retrain_and_qnorm(ft: FastTextFiles, tmp_path: Path) -> None:
    context = Context(train_data=read_labelled_text(ft.train), eval_data=read_labelled_text(ft.test))
    model = plugin.compressor_load(ft.model, "fasttext", context)
    step = Step("pq", {"cutoff": 1000, "retrain": True, "qnorm": True, "dsub": 4, "epoch": 2, "thread": 1})
    compressed = plugin.compressor_compress(model, step, context)
    artifact = plugin.compressor_save(compressed, tmp_path / "variant", context)
    assert artifact.path == tmp_path / "variant.ftz"
    layout = read_layout(artifact.path)
    assert layout.quantized and layout.input.qnorm and layout.input.dsub == 4
    assert layout.input.rows == 1000 and layout.pruned_ngrams >= 0
    assert artifact.path.stat().st_size * 5 < ft.model.stat().st_size
    changed = compressed.metadata["labels_changed_most"]
    assert sum(row["lost"] for row in changed) == compressed.metadata["eval_predictions_changed"]
    assert compressed.metadata["quantized"] and compressed.metadata["input_rows"] == 1000


def test_pq_without_cutoff_keeps_every_row_and_cannot_retrain(ft: FastTextFiles, tmp_path: Path) -> None:
    context = Context(train_data=read_labelled_text(ft.train))
    model = plugin.compressor_load(ft.model, "fasttext", context)
    compressed = plugin.compressor_compress(model, Step("pq", {"retrain": True}), context)
    layout = read_layout(plugin.compressor_save(compressed, tmp_path / "pq", context).path)
    assert layout.input.rows == read_layout(ft.model).input.rows and layout.input.dsub == 2
    assert not layout.input.qnorm and not layout.output.quantized and layout.pruned_ngrams == -1
    assert any("retrain had no effect" in note for note in compressed.notes)


def test_labels_changed_most_counts_moves_both_ways() -> None:
    assert labels_changed_most(["a", "a", "b", "c"], ["a", "b", "b", "a"]) == [
        {"label": "a", "lost": 1, "gained": 1, "predicted": 2},
        {"label": "b", "lost": 0, "gained": 1, "predicted": 1},
        {"label": "c", "lost": 1, "gained": 0, "predicted": 1},
    ]


def test_qout_quantizes_the_output_of_a_model_with_many_labels(ft: FastTextFiles, tmp_path: Path) -> None:
    model = plugin.compressor_load(ft.many_labels, "fasttext", Context())
    compressed = plugin.compressor_compress(model, Step("pq", {"qout": True}), Context())
    layout = read_layout(plugin.compressor_save(compressed, tmp_path / "qout", Context()).path)
    assert layout.output.quantized and layout.output.rows == 300


@pytest.mark.parametrize(
    ("model", "params", "error", "message"),
    [
        ("vectors", {}, UnsupportedError, "supervised"),
        ("quantized", {}, UnsupportedError, "already product-quantized"),
        ("tiny", {}, CompressionError, "at least 256 input rows"),
        ("model", {"cutoff": 100}, CompressionError, "cutoff=100 keeps 100"),
        ("model", {"qout": True}, CompressionError, "qout needs at least 256 labels"),
        ("model", {"dsub": 17}, UsageError, "dsub=17 is larger than the model's dim 16"),
    ],
)
def test_pq_refuses_what_fasttext_cannot_quantize(
    ft: FastTextFiles, model: str, params: dict[str, object], error: type[Exception], message: str
) -> None:
    loaded = plugin.compressor_load(getattr(ft, model), "fasttext", Context())
    with pytest.raises(error, match=message):
        plugin.compressor_compress(loaded, Step("pq", params), Context())


def measure_here(artifact: Artifact, data: Dataset, settings: MeasureSettings) -> RuntimeMeasurement:
    """The artifact measured as the measuring process measures it: opened through the backend's
    runtime (timed as ``load_ms``), then run and compared by core's engine."""
    with Stopwatch() as load:
        runtime = plugin.compressor_open_runtime(artifact, settings)
    try:
        measured = measure_runtime(runtime, data, settings)
    finally:
        runtime.close()
    measured.metrics["load_ms"] = load.ms
    return measured


def test_measure_matches_fasttext_test(ft: FastTextFiles) -> None:
    import fasttext

    data = read_labelled_text(ft.test)
    artifact = plugin.compressor_save(
        plugin.compressor_load(ft.quantized, "fasttext", Context()), ft.folder / "measured", Context()
    )
    measured = measure_here(artifact, data, quick_settings(k=2))
    reference = fasttext.load_model(str(ft.quantized))
    metrics = measured.metrics
    assert metrics["accuracy"] == pytest.approx(reference.test(str(ft.test), k=1)[1])
    _, precision, recall = reference.test(str(ft.test), k=2)
    assert (metrics["precision_at_k"], metrics["recall_at_k"]) == pytest.approx((precision, recall))
    by_label = reference.test_label(str(ft.test), k=2)
    assert metrics["per_label_f1"] == pytest.approx({k: v["f1score"] for k, v in by_label.items()})
    assert len(measured.kept["label"]["top1"]) == data.size
    assert measured.outputs["label"]["task"] == "classifier"
    assert metrics["latency_ms"]["p50"] > 0 and metrics["latency_batch_ms"]["iterations"] >= 3
    assert metrics["load_ms"] > 0


def test_measure_word_vectors_returns_sentence_vectors(ft: FastTextFiles) -> None:
    data = read_labelled_text(ft.test)
    artifact = plugin.compressor_save(
        plugin.compressor_load(ft.vectors, "fasttext", Context()), ft.folder / "vectors-out", Context()
    )
    measured = measure_here(artifact, data, quick_settings())
    assert "label" not in measured.kept
    assert measured.kept["sentence_vector"]["vectors"].shape == (data.size, 8)


def test_sample_model_trains_quickly_and_loads(tmp_path: Path) -> None:
    (sample,) = plugin.compressor_sample_models(tmp_path)
    layout = read_layout(sample.path)
    assert layout.supervised and layout.labels == 6 and layout.input.rows >= 256
    assert sample.train_data.exists() and sample.eval_data.exists()
    assert os.path.getsize(sample.path) > 0
