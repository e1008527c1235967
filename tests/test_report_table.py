"""The terminal and Markdown table: each output's headline figure, every marker explained
under the table, a failed variant's message cut short in it and given in full below."""

from __future__ import annotations

from typing import Any

from report_fixtures import SETTINGS, metrics

from compressor.cautions import apply_cautions
from compressor.report import Report, VariantResult, render_markdown, render_table


def embedding_output(agreement: float, mean: float, low: float) -> dict[str, Any]:
    return {"task": "embedding", "reason": "named 'sentence_embedding': one vector per example", "shape": [384],
            "agreement": agreement, "headline_metric": "neighbour_agreement",
            "agreement_kind": "nearest neighbour among the evaluation examples",
            "cosine": {"mean": mean, "min": low}}


def encoder_report() -> Report:
    variants = []
    for name, steps, size, output in (
        ("original", [], 90_000_000, embedding_output(1.0, 1.0, 1.0)),
        ("dynamic", ["quantize dynamic"], 23_000_000, embedding_output(0.98, 0.99876, 0.9512)),
        ("fp16", ["quantize fp16"], 45_000_000, embedding_output(1.0, 0.99999, 0.99990)),
    ):
        found = metrics(size, 4.0, 300_000_000, agreement=output["agreement"], cosine=output["cosine"],
                        outputs={"sentence_embedding": output})
        variants.append(VariantResult(name, steps, f"{name}.onnx", found))
    variants.append(VariantResult("int4", ["quantize int4"], error="quantization failed: " + "x" * 790))
    report = Report("minilm.onnx", "onnx", "2026-12-01T08:00:00+00:00", variants, settings=dict(SETTINGS),
                    budgets={"min_agreement": 0.99})
    variants[1].budget_failures = ["agreement 0.9800 below --min-agreement 0.99"]
    apply_cautions(report)
    return report


def test_embedding_rows_show_cosine_beside_neighbour_agreement() -> None:
    table = render_table(encoder_report())
    rows = {line.split()[0]: line for line in table.splitlines() if line and line.split()[0] in
            ("original", "dynamic", "fp16")}
    assert rows["dynamic"].endswith("nn 98.00% cos 0.9988 min 0.9512")
    assert rows["fp16"].endswith("nn 100.00% cos 1.0000")  # the minimum only where it matters
    assert "agreement nn: share of examples whose nearest neighbour is the original's; cos: mean cosine" \
        in table
    assert "output sentence_embedding: embedding, named 'sentence_embedding': one vector per example " \
           "(--set task.sentence_embedding=TASK to change)" in table
    assert "nn 98.00% cos 0.9988 min 0.9512" in render_markdown(encoder_report())


def test_every_marker_in_the_table_is_explained_under_it() -> None:
    report = encoder_report()
    report.variants[2].warnings = ["slower than the original: p50 5 ms vs 4 ms (+25%)"]
    table = render_table(report)
    head, _, below = table.partition("\n\n")
    assert "dynamic !" in head and "fp16 ?" in head and "FAILED" in head
    for line in ("smaller: original's size / the variant's; '-': not measured",
                 "!: outside the budget (why: below)",
                 "?: worse than it looks (warnings below); never picked as the best trade-off",
                 "FAILED: the variant could not be made or measured (the full message below)"):
        assert line in below, line
    markdown = render_markdown(report)
    assert "- ?: worse than it looks" in markdown and "- !: outside the budget" in markdown


def test_a_failed_variants_long_message_is_cut_in_the_table_and_given_in_full_below() -> None:
    report = encoder_report()
    table = render_table(report)
    lines = table.splitlines()
    header = lines[0]
    assert len(header) < 130  # the size column is as wide as a size, not as the message
    failed = next(line for line in lines if line.startswith("int4"))
    assert len(failed) < 130 and failed.endswith("... (below)")
    full = "FAILED int4: quantization failed: " + "x" * 790
    assert full in table and table.count("x" * 790) == 1
    assert header.index("gzip") - header.index("size") == len("85.8 MB") + 2
