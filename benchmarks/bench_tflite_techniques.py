"""``qat``, pruning then quantization, and ``distill`` on the tflite backend, through the
compressor CLI, on the Keras digits CNN of ``bench_tflite.py`` (Conv 32, Conv 64, Dense 128;
151k parameters) trained 30 epochs on 70% of scikit-learn's digits; 540 held-out images.

* quantization: post-training ``quantize int8`` against ``qat``;
* pruning: ``prune 0.8`` then ``quantize int8`` (floor: <= 0.5 pt accuracy drop against the
  original) and ``prune 0.8`` then ``qat`` (the share of zeros in the saved int8 weights);
* distillation: ``distill width=0.5`` (a student with about a quarter of the parameters;
  floor: <= 2 pt drop) against the same student trained from scratch on the same data and
  epochs (``alpha=0``: labels only); distillation must beat it. Also on 250 labelled images.

Run: ``python benchmarks/bench_tflite_techniques.py [--only quantize,distill] [--no-write]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import compressor_cli, machine, markdown_table, write_section  # noqa: E402
from bench_techniques import cpu_line  # noqa: E402

DISTRIBUTIONS = ("tensorflow-cpu", "tf-keras", "tensorflow-model-optimization", "ai-edge-litert")
MEASURE = ("--threads", "1", "--repeats", "3")
PRUNE_EPOCHS = 3
QAT_EPOCHS = 3
QUANTIZE_RECIPE = f"""
[variants.int8]
steps = ["quantize int8"]
[variants.qat]
steps = ["qat epochs={QAT_EPOCHS}"]
[variants.sparse80-int8]
steps = ["prune 0.8 epochs={PRUNE_EPOCHS}", "quantize int8"]
[variants.sparse80-qat]
steps = ["prune 0.8 epochs={PRUNE_EPOCHS}", "qat epochs={QAT_EPOCHS}"]
"""
DISTILL_EPOCHS = 30
DISTILL = f"distill width=0.5 epochs={DISTILL_EPOCHS}"
DISTILL_RECIPE = f"""
[variants.distilled]
steps = ["{DISTILL}"]
[variants.distilled-t4]
steps = ["{DISTILL} temperature=4 alpha=0.9"]
[variants.scratch]
steps = ["{DISTILL} alpha=0"]
[variants.distilled-dynamic]
steps = ["{DISTILL}", "quantize dynamic"]
"""
#: The small-data case: the student learns from this many labelled images (the teacher saw all 1,257).
TRANSFER = 250
SMALL_EPOCHS = 60
SMALL = f"distill width=0.5 epochs={SMALL_EPOCHS}"
SMALL_RECIPE = f"""
[variants.distilled]
steps = ["{SMALL}"]
[variants.distilled-t4]
steps = ["{SMALL} temperature=4 alpha=0.9"]
[variants.scratch]
steps = ["{SMALL} alpha=0"]
"""
HEADER = ["variant", "steps", "KB", "gzip KB", "accuracy %", "drop pt", "agreement", "zeros in weights",
          "p50 us (b1)", "faster (b1)"]


def teacher(work: Path) -> dict[str, Path]:
    from bench_tflite import trained_digits_cnn

    model, train_x, train_y, test_x, test_y = trained_digits_cnn()
    paths = {name: work / f"{name}.npz" for name in ("train", "transfer", "calibration", "eval")}
    paths["model"] = work / "cnn.keras"
    model.save(paths["model"])
    np.savez(paths["train"], x=train_x, y=train_y)
    np.savez(paths["transfer"], x=train_x[:TRANSFER], y=train_y[:TRANSFER])
    np.savez(paths["calibration"], x=train_x[:300])
    np.savez(paths["eval"], x=test_x, y=test_y)
    return paths


def run(paths: dict[str, Path], work: Path, name: str, recipe_text: str, train: Path) -> dict[str, Any]:
    recipe = work / f"{name}.toml"
    recipe.write_text(recipe_text)
    out = work / f"{name}-out"
    compressor_cli("run", str(paths["model"]), "--recipe", str(recipe), "--train-data", str(train),
                   "--calibration-data", str(paths["calibration"]), "--data", str(paths["eval"]),
                   "-o", str(out), *MEASURE)
    report = json.loads((out / "report.json").read_text())
    return {v["name"]: {**v, "path": out / v["artifact"]} for v in report["variants"]}


def weight_zeros(path: Path) -> float | None:
    """The share of zeros in an integer model's int8 weight tensors (activations have batch 1)."""
    from compressor_tflite import frameworks

    interpreter = frameworks.interpreter_class()[0](model_path=str(path))
    interpreter.allocate_tensors()
    weights = [interpreter.get_tensor(d["index"]) for d in interpreter.get_tensor_details()
               if d["dtype"] == np.int8 and len(d["shape"]) >= 2 and d["shape"][0] > 1]
    if not weights:
        return None
    return sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)


def rows(variants: dict[str, Any]) -> list[list[str]]:
    base = variants["original"]["metrics"]
    table = []
    for name, variant in variants.items():
        if variant.get("error"):
            table.append([name, "failed: " + variant["error"]] + [""] * (len(HEADER) - 2))
            continue
        metrics = variant["metrics"]
        zeros = weight_zeros(variant["path"]) if metrics.get("input_dtypes") == "int8" else None
        table.append([
            name, " > ".join(f"`{step}`" for step in variant["steps"]) or "-",
            f"{metrics['size_bytes'] / 1e3:.1f}", f"{metrics['size_gzip_bytes'] / 1e3:.1f}",
            f"{metrics['accuracy'] * 100:.2f}", f"{(base['accuracy'] - metrics['accuracy']) * 100:+.2f}",
            f"{metrics.get('agreement', 1.0):.4f}", f"{zeros:.1%}" if zeros is not None else "-",
            f"{metrics['latency_ms']['p50'] * 1000:.1f}",
            f"{base['latency_ms']['p50'] / metrics['latency_ms']['p50']:.2f}x",
        ])
    return table


def drop(variants: dict[str, Any], name: str) -> float:
    return (variants["original"]["metrics"]["accuracy"] - variants[name]["metrics"]["accuracy"]) * 100


def quantize_case(paths: dict[str, Path], work: Path) -> tuple[str, list[str]]:
    variants = run(paths, work, "quantize", QUANTIZE_RECIPE, paths["train"])
    pruned_drop = drop(variants, "sparse80-int8")
    zeros = weight_zeros(variants["sparse80-qat"]["path"]) or 0.0
    failures = [] if pruned_drop <= 0.5 else [f"sparse80-int8 lost {pruned_drop:.2f} pt"]
    failures += [] if zeros >= 0.75 else [f"sparse80-qat kept only {zeros:.1%} zeros"]
    return f"""### Quantization-aware training and pruning, then int8

`qat epochs={QAT_EPOCHS}`: tfmot's `quantize_model`, fine-tuned on the 1,257 training images (Adam 1e-4), then
full-integer int8 (int8 input and output). `prune 0.8 epochs={PRUNE_EPOCHS}`: the polynomial schedule reaches 80%
at the end of epoch {PRUNE_EPOCHS - 1}; the last epoch fine-tunes under the final masks. After it, `qat` uses
tfmot's prune-preserving scheme. "zeros in weights": the share of zeros in the saved int8 weight tensors.

{markdown_table(HEADER, rows(variants))}

Floors: `prune 0.8` + `quantize int8` {pruned_drop:+.2f} pt (<= 0.5 pt: {'pass' if pruned_drop <= 0.5 else 'FAIL'});
`prune 0.8` + `qat` keeps {zeros:.1%} zeros in its int8 weights ({'pass' if zeros >= 0.75 else 'FAIL'}); `qat`
{drop(variants, 'qat'):+.2f} pt against post-training int8's {drop(variants, 'int8'):+.2f} pt.
""", failures


def distill_case(paths: dict[str, Path], work: Path) -> tuple[str, list[str]]:
    variants = run(paths, work, "distill", DISTILL_RECIPE, paths["train"])
    small = run(paths, work, "distill-small", SMALL_RECIPE, paths["transfer"])
    facts = variants["distilled"]["metadata"]["distillation"]
    distilled, scratch = drop(variants, "distilled"), drop(variants, "scratch")
    failures = [] if distilled <= 2.0 else [f"distilled lost {distilled:.2f} pt"]
    failures += [] if distilled < scratch else [f"distilled ({distilled:+.2f} pt) did not beat scratch "
                                                f"({scratch:+.2f} pt)"]
    return f"""### Distillation into a quarter-size student

`{DISTILL}`: the teacher's architecture with half the filters and units (Conv 16, Conv 32, Dense 64;
{facts['parameters_student']:,} parameters against {facts['parameters_teacher']:,}), fresh weights, trained on the 1,257
labelled training images (Adam 1e-3, batch 32) with 0.5 x the teacher's softened outputs (T=2) + 0.5 x the labels'
cross-entropy (`distilled-t4`: T=4, 0.9 x soft). `scratch` is the same student, data and epochs with `alpha=0`
(labels only). One run each: one image is 0.19 pt.

{markdown_table(HEADER, rows(variants))}

Floors: distilled {distilled:+.2f} pt (<= 2 pt: {'pass' if distilled <= 2 else 'FAIL'}); from scratch {scratch:+.2f} pt
(distillation {'beats' if distilled < scratch else 'does NOT beat'} it).

The same students trained on only the first {TRANSFER} labelled images ({SMALL_EPOCHS} epochs), no floor:

{markdown_table(HEADER, rows(small))}

Distilled {drop(small, 'distilled'):+.2f} pt, T=4 {drop(small, 'distilled-t4'):+.2f} pt, from scratch
{drop(small, 'scratch'):+.2f} pt.
""", failures


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="quantize,distill")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    chosen = set(args.only.split(","))
    sections, failures = [], []
    with tempfile.TemporaryDirectory(prefix="bench-tflite-techniques-") as scratch:
        work = Path(scratch)
        paths = teacher(work)
        for name, case in (("quantize", quantize_case), ("distill", distill_case)):
            if name in chosen:
                text, missed = case(paths, work)
                sections.append(text)
                failures += missed
    verdict = "All floors hold." if not failures else "Floors missed: " + "; ".join(failures) + "."
    markdown = (
        "## tflite: QAT, pruning then int8, distillation (`benchmarks/bench_tflite_techniques.py`)\n\n"
        "The Keras digits CNN of `bench_tflite.py` (Conv2D 32, Conv2D 64, max-pool, Dense 128, dropout, Dense 10) "
        "trained 30 epochs on 70% of scikit-learn's digits; 540 held-out images; 300 training images calibrate "
        "int8. Every variant through `compressor run` (fresh measuring subprocesses, 1 thread, 3 interleaved "
        f"repeats, medians). CPU: {cpu_line()}.\n\n" + "\n".join(sections) + f"\n{verdict}\n\n"
        + machine(DISTRIBUTIONS) + "\n"
    )
    print(markdown)
    if not args.no_write:
        write_section("tflite-techniques", markdown)
    if failures:
        print(verdict, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
