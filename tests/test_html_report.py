"""The Pareto front, the SVG and PNG charts and report.html, on hand-built reports."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from html.parser import HTMLParser
from pathlib import Path

import pytest
from report_fixtures import SETTINGS, fasttext_report, metrics, onnx_report

from compressor import charts
from compressor.charts import (
    LATENCY,
    SIZE,
    Point,
    front_names,
    pareto_front,
    report_charts,
    write_png,
)
from compressor.html_report import READ_BEFORE_DEPLOYING, render_html
from compressor.report import Report, VariantResult

SVG = "{http://www.w3.org/2000/svg}"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VOID_ELEMENTS = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr", "source"}
SVG_LEAVES = {"line", "rect", "circle", "polyline"}


class TagBalance(HTMLParser):
    """Fails on a closing tag that does not close the innermost open element."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.seen: list[str] = []
        self.problems: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.seen.append(tag)
        if tag not in VOID_ELEMENTS:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.seen.append(tag)
        if tag not in VOID_ELEMENTS | SVG_LEAVES:
            self.problems.append(f"self-closed <{tag}/>")

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1] != tag:
            self.problems.append(f"</{tag}> while {self.open[-3:]} are open")
        else:
            self.open.pop()


def parse_html(document: str) -> TagBalance:
    parser = TagBalance()
    parser.feed(document)
    parser.close()
    assert parser.problems == []
    assert parser.open == []
    return parser


def names(found: list[Point]) -> list[str]:
    return [point.name for point in found]


# ---------------------------------------------------------------- the front


def test_front_keeps_points_nothing_beats_smallest_first() -> None:
    candidates = [Point("big", 100, 0.95), Point("small", 10, 0.90), Point("worse", 50, 0.80),
                  Point("mid", 40, 0.93)]
    assert names(pareto_front(candidates)) == ["small", "mid", "big"]


def test_front_ties() -> None:
    # Same size, less accurate: beaten. Same accuracy, larger: beaten. Identical: both stay.
    candidates = [Point("a", 10, 0.9), Point("same-size-worse", 10, 0.8),
                  Point("same-accuracy-larger", 20, 0.9), Point("twin-1", 5, 0.7), Point("twin-2", 5, 0.7)]
    assert names(pareto_front(candidates)) == ["twin-1", "twin-2", "a"]


def test_front_of_one_point_and_of_none() -> None:
    assert names(pareto_front([Point("only", 1, 0.5)])) == ["only"]
    assert pareto_front([]) == []


def test_front_of_reports_for_size_and_latency() -> None:
    report = onnx_report()
    assert front_names(report, SIZE) == ["dynamic", "fp16"]
    assert front_names(report, LATENCY) == ["dynamic", "original"]


def test_quality_falls_back_to_agreement_then_cosine_and_skips_missing_values() -> None:
    report = onnx_report()
    for variant in report.variants:
        del variant.metrics["accuracy"]
    assert charts.quality_measure(report).title == "agreement with the original"
    assert front_names(report) == ["dynamic", "fp16"]  # fp16 agrees 100%, dynamic 99.44%

    report.variants[2].metrics.pop("agreement")  # dynamic: no agreement measured
    # int8 would be on the front, but it is outside the budget: never a best trade-off.
    assert front_names(report) == ["fp16"]

    embeddings = Report("minilm.onnx", "onnx", "2026-11-22T07:00:00+00:00", [
        VariantResult("original", [], metrics=metrics(90_000_000, 8.0, 400_000_000, cosine={"mean": 1.0, "min": 1.0})),
        VariantResult("int8", ["quantize dynamic"],
                      metrics=metrics(23_000_000, 5.0, 300_000_000, cosine={"mean": 0.991, "min": 0.95})),
    ])
    assert charts.quality_measure(embeddings).title.startswith("cosine")
    assert front_names(embeddings) == ["int8", "original"]

    embeddings.variants[1].metrics.pop("cosine")
    embeddings.variants[0].metrics.pop("cosine")
    assert charts.quality_measure(embeddings) is None
    assert front_names(embeddings) == []


def test_failed_variants_are_not_plotted() -> None:
    report = onnx_report()
    report.variants.append(VariantResult("uint8", ["quantize uint8"], error="no calibration op"))
    assert "uint8" not in names(charts.points(report, SIZE, charts.quality_measure(report)))


# ---------------------------------------------------------------- axes


def test_axis_goes_logarithmic_over_ten_times_with_round_byte_ticks() -> None:
    axis = charts.Axis.fit([350_000, 9_500_000], 0, 100, SIZE)
    assert axis.log
    assert [SIZE.format(t) for t in axis.ticks()] == ["500.0 KB", "1.0 MB", "2.0 MB", "5.0 MB", "10.0 MB"]
    assert axis(350_000) < axis(1_000_000) < axis(9_500_000)

    linear = charts.Axis.fit([110_000, 400_000], 0, 100, SIZE)
    assert not linear.log
    assert [SIZE.format(t) for t in linear.ticks()] == ["100.0 KB", "200.0 KB", "300.0 KB", "400.0 KB"]


def test_share_axes_stop_at_one_hundred_percent() -> None:
    accuracy = charts.quality_measure(onnx_report())
    axis = charts.Axis.fit([1.0, 1.0], 0, 100, accuracy, allow_log=False)
    assert max(axis.ticks()) <= 1.0
    assert accuracy.format(axis.ticks()[-1]) == "100.00%"


# ---------------------------------------------------------------- SVG


def test_svg_charts_parse_and_mark_the_front() -> None:
    report = onnx_report()
    found = {chart.title: chart.svg for chart in report_charts(report)}
    assert list(found) == ["Size vs accuracy", "Latency (p50) vs accuracy", "Size per variant",
                           "Latency p50 per variant", "Peak RAM per variant"]
    scatter = ElementTree.fromstring(found["Size vs accuracy"])
    texts = [t.text for t in scatter.iter(f"{SVG}text")]
    for name in ("original", "fp16", "dynamic", "int8"):
        assert name in texts
    front_points = scatter.find(f"{SVG}polyline").get("points").split()
    assert len(front_points) == 2  # dynamic and fp16, joined
    highlighted = [c.find(f"{SVG}title").text for c in scatter.iter(f"{SVG}circle")
                   if c.get("fill") == charts.FRONT_COLOUR and c.find(f"{SVG}title") is not None]
    assert sorted(t.split(":")[0] for t in highlighted) == ["dynamic", "fp16"]
    ringed = [c.find(f"{SVG}title").text for c in scatter.iter(f"{SVG}circle")
              if c.get("stroke") == charts.FAIL_COLOUR and c.find(f"{SVG}title") is not None]
    assert [t.split(":")[0] for t in ringed] == ["int8"]


def test_bars_follow_variant_order_and_scale_with_values() -> None:
    report = onnx_report()
    svg = ElementTree.fromstring(charts.bar_svg(report, SIZE, "Size per variant"))
    widths = [float(rect.get("width")) for rect in svg.iter(f"{SVG}rect")]
    sizes = [v.metrics["size_bytes"] for v in report.variants]
    assert widths.index(max(widths)) == 0
    assert widths[1] / widths[0] == pytest.approx(sizes[1] / sizes[0], rel=0.01)
    labels = [t.text for t in svg.iter(f"{SVG}text")]
    assert labels.index("original") < labels.index("fp16") < labels.index("dynamic") < labels.index("int8")


# ---------------------------------------------------------------- HTML


def test_html_is_self_contained_and_well_formed() -> None:
    report = onnx_report()
    document = render_html(report)
    parsed = parse_html(document)
    assert parsed.seen.count("svg") == 5
    assert "script" not in parsed.seen
    assert "src=" not in document and "href=" not in document and "@import" not in document
    for name in ("original", "fp16", "dynamic", "int8"):
        assert f"<h3>{name}</h3>" in document or name == "original"
    assert 'class="over-budget"><td>int8 !</td>' in document
    assert "accuracy drop 6.11 pt exceeds --max-accuracy-drop 1" in document
    assert "(Pareto front): <b>dynamic, fp16</b>" in document
    assert "calibrated on 64 examples" in document
    assert "AMD EPYC 7B13" in document and "avx2, fma, f16c" in document and "onnxruntime" in document
    assert "<th>min_seconds</th><td>0.5</td>" in document


def test_html_shows_confusion_and_changed_inputs_with_advice() -> None:
    document = render_html(onnx_report())
    assert READ_BEFORE_DEPLOYING in document
    int8 = document[document.index("<h3>int8</h3>"):]
    assert '<td class="moved">19</td>' in int8  # original 2 -> compressed 1
    assert "The first 2 of 29 inputs" in int8
    assert "<tr><td>9</td><td>2</td><td>1</td><td>2</td><td>original</td></tr>" in int8
    fp16 = document[document.index("<h3>fp16</h3>"):document.index("<h3>dynamic</h3>")]
    assert "Every top prediction matches original." in fp16
    assert "<table" not in fp16


def test_html_escapes_everything_from_the_report() -> None:
    report = fasttext_report()
    hostile = "<script>alert('x')</script>"
    report.model = "<img src=x onerror=alert(1)>.bin"
    pq = report.variants[1]
    pq.name = hostile
    pq.notes = ["cutoff < vocabulary & retrain"]
    pq.metrics["confusion"]["labels"][0] = "<b>admin</b>"
    pq.metrics["changed_examples"][0]["compressed"] = "</td><script>"
    document = render_html(report)
    parse_html(document)
    assert "<script" not in document and "<img" not in document and "<b>admin" not in document
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in document
    assert "cutoff &lt; vocabulary &amp; retrain" in document
    for chart in report_charts(report):
        ElementTree.fromstring(chart.svg)


def test_large_confusion_matrix_keeps_only_classes_that_changed() -> None:
    labels = [f"__label__{i}" for i in range(20)]
    matrix = [[10 if i == j else 0 for j in range(20)] for i in range(20)]
    matrix[3][7] = 2
    report = fasttext_report()
    report.variants[1].metrics["confusion"] = {"labels": labels, "matrix": matrix}
    document = render_html(report)
    table = document[document.index('<table class="confusion">'):]
    table = table[: table.index("</table>")]
    assert "18 classes whose predictions never changed are left out" in table
    assert table.count("<tr>") == 3  # header and the two classes involved
    assert '<td class="moved">2</td>' in table


def test_report_without_evaluation_data() -> None:
    report = Report("model.tflite", "tflite", "2026-11-22T07:00:00+00:00",
                    [VariantResult("original", [], "original.tflite", metrics(1_000_000, 0.2, 90_000_000))],
                    settings=dict(SETTINGS))
    document = render_html(report)
    parse_html(document)
    assert "so there is no Pareto front" in document
    assert [c.title for c in report_charts(report)] == ["Size per variant", "Latency p50 per variant",
                                                         "Peak RAM per variant"]


# ---------------------------------------------------------------- PNG


def test_png_is_written_atomically(tmp_path: Path) -> None:
    target = tmp_path / "report.png"
    assert write_png(onnx_report(), target)
    data = target.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]


def test_png_needs_matplotlib_and_something_to_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_quality = onnx_report()
    for variant in no_quality.variants:
        for key in ("accuracy", "agreement"):
            variant.metrics.pop(key)
    assert not write_png(no_quality, tmp_path / "empty.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert not write_png(onnx_report(), tmp_path / "report.png")
    assert list(tmp_path.iterdir()) == []


def test_importing_report_modules_imports_no_matplotlib_or_numpy() -> None:
    code = ("import sys, compressor.charts, compressor.html_report, compressor.merging; "
            "print(sorted(m for m in ('matplotlib', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_html_rounds_cosine_and_never_shows_an_unknown_count_of_changed_inputs() -> None:
    report = fasttext_report()
    pq = report.variants[1]
    for key in ("changed_count", "changed_examples", "confusion"):
        pq.metrics.pop(key, None)
    pq.metrics.update(agreement=0.99, cosine={"mean": 0.9937693871192321, "min": 0.9012345678})
    document = render_html(report)
    parse_html(document)
    assert "(? inputs changed)" not in document and "0.9937693871192321" not in document
    assert "cosine similarity mean 0.9938, min 0.9012" in document


def test_html_gives_each_output_its_task_evidence_and_headline() -> None:
    report = onnx_report()
    dynamic = report.variants[2]
    dynamic.metrics["outputs"] = {
        "prob": {"task": "map", "reason": "[N, 2, 55, 75]: class probabilities over 2 channels (axis 1)",
                 "shape": [2, 55, 75], "agreement": 0.9971, "pixel_agreement": 0.9971,
                 "headline_metric": "pixel_agreement", "foreground_iou": 0.9612},
        "reg": {"task": "regression", "reason": "[N, 4, 55, 75] beside 'prob'", "shape": [4, 55, 75],
                "relative_error": {"mean": 0.0123456, "max": 0.0456789},
                "cosine": {"mean": 0.99991234, "min": 0.9981},
                "nonfinite": {"examples": 3, "share": 0.015, "original_examples": 0, "new_examples": 3}},
    }
    document = render_html(report)
    parse_html(document)
    section = document[document.index("<h3>dynamic</h3>"):document.index("<h3>int8</h3>")]
    assert "<code>--set task.prob=TASK</code> to change" in section
    assert "px 99.71%" in section and "share of pixels whose decision is the original&#x27;s" in section
    assert "foreground IoU 96.12%" in section
    assert "relative error mean 0.0123, max 0.0457" in section and "cosine mean 0.9999, min 0.9981" in section
    assert "NaN or Inf in 3 examples (1.50%)" in section
