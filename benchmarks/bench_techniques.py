"""Structured compression through the compressor CLI: ``prune structure=channel`` on two
digits models and ``lowrank`` on all-MiniLM-L6-v2's feed-forward layers.

* ``mlp``: a 64-512-512-10 torch MLP trained here on 75% of scikit-learn's digits (a
  state_dict, ``--set model_factory=bench_techniques:wide_mlp``), onnx backend, channel
  pruning fine-tuned on the training split (on the torch model, against the unpruned one).
* ``cnn``: the Keras digits CNN of ``bench_tflite.py`` (Conv 32, Conv 64, Dense 128),
  tflite backend, channel pruning fine-tuned on the training split.
* ``minilm``: ``lowrank energy=0.9`` (and ``rank=128``, which removes more than 40% of
  each factorized layer's FLOPs) on the intermediate and output dense MatMuls; 200 real
  sentences as in ``bench_onnx_minilm.py``.

Floors (issue 17): channel pruning >= 1.5x faster at batch 1 with <= 1 pt accuracy drop
where the backend fine-tunes; a measured batch-1 latency gain wherever >= 40% of a
layer's FLOPs are removed. Run: ``python benchmarks/bench_techniques.py [--only mlp,cnn,minilm]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import SHARED, compressor_cli, machine, markdown_table, train_classifier, write_section  # noqa: E402

FACTORY = "bench_techniques:wide_mlp"
HIDDEN = 512
FFN = "*/intermediate/dense/*,*/layer.?/output/dense/*"
MEASURE = ("--threads", "1", "--repeats", "3")
CNN_EPOCHS = 10
MLP_EPOCHS = 10
MLP_RECIPE = f"""
[variants.channel50-one-shot]
steps = ["prune 0.5 structure=channel epochs=0"]
[variants.channel50]
steps = ["prune 0.5 structure=channel epochs={MLP_EPOCHS}"]
[variants.channel50-dynamic]
steps = ["prune 0.5 structure=channel epochs={MLP_EPOCHS}", "quantize dynamic"]
[variants.channel75]
steps = ["prune 0.75 structure=channel epochs={MLP_EPOCHS}"]
[variants.dynamic]
steps = ["quantize dynamic"]
"""
CNN_RECIPE = f"""
[variants.channel50-one-shot]
steps = ["prune 0.5 structure=channel epochs=0"]
[variants.channel50]
steps = ["prune 0.5 structure=channel epochs={CNN_EPOCHS}"]
[variants.channel50-dynamic]
steps = ["prune 0.5 structure=channel epochs={CNN_EPOCHS}", "quantize dynamic"]
[variants.dynamic]
steps = ["quantize dynamic"]
"""
TUNE = "epochs=1 batch_size=16 learning_rate=1e-4"
TRAIN_SENTENCES, TRAIN_TOKENS = 3072, 64
MINILM_RECIPE = f"""
[variants.lowrank90]
steps = ["lowrank energy=0.9 layers={FFN} epochs=0"]
[variants.lowrank-rank128]
steps = ["lowrank rank=128 layers={FFN} epochs=0"]
[variants.lowrank90-tuned]
steps = ["lowrank energy=0.9 layers={FFN} {TUNE}"]
[variants.lowrank90-dynamic]
steps = ["lowrank energy=0.9 layers={FFN} epochs=0", "quantize dynamic"]
[variants.dynamic]
steps = ["quantize dynamic"]
"""


def wide_mlp() -> Any:
    """The benchmark's MLP, untrained: 64 pixels -> 512 -> 512 -> 10 classes."""
    import torch

    return torch.nn.Sequential(torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
                               torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10))


def cpu_line() -> str:
    """The CPU's model, family/model numbers and clock from /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return (f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')} model "
            f"{fields.get('model', '?')}, {float(fields.get('cpu MHz', 0)) / 1000:.1f} GHz, "
            f"{os.cpu_count()} cores)")


def run(model: Path, recipe_text: str, work: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    recipe = work / f"{model.stem}.toml"
    recipe.write_text(recipe_text)
    out = work / f"{model.stem}-out"
    compressor_cli("run", str(model), "--recipe", str(recipe), "-o", str(out), *MEASURE, *args, env=env)
    report = json.loads((out / "report.json").read_text())
    return {variant["name"]: variant for variant in report["variants"]}


def speed(base: dict[str, Any], metrics: dict[str, Any], key: str = "p50") -> float:
    return base["latency_ms"][key] / metrics["latency_ms"][key]


def classifier_rows(variants: dict[str, Any], unit: float) -> list[list[str]]:
    base = variants["original"]["metrics"]
    rows = []
    for name, variant in variants.items():
        if variant.get("error"):
            rows.append([name, "failed: " + variant["error"]] + [""] * 8)
            continue
        metrics = variant["metrics"]
        rows.append([
            name, f"{metrics['size_bytes'] / 1e3:.1f}", f"{metrics['accuracy'] * 100:.2f}",
            f"{(base['accuracy'] - metrics['accuracy']) * 100:+.2f}", f"{metrics.get('agreement', 1.0):.4f}",
            f"{metrics['latency_ms']['p50'] * unit:.1f}", f"{speed(base, metrics):.2f}x",
            f"{metrics['latency_ms']['p50_fastest_window'] * unit:.1f}",
            f"{speed(base, metrics, 'p50_fastest_window'):.2f}x",
            f"{metrics['latency_batch_ms']['p50'] * unit:.0f}",
        ])
    return rows


CLASSIFIER_HEADER = ["variant", "KB", "accuracy %", "drop pt", "agreement", "p50 us (b1)", "faster",
                     "fastest-window p50 us", "faster (fastest window)", "p50 us (b32)"]


def verdict(variants: dict[str, Any], name: str, must_hold: bool) -> str:
    base, metrics = variants["original"]["metrics"], variants[name]["metrics"]
    faster, drop = speed(base, metrics), (base["accuracy"] - metrics["accuracy"]) * 100
    held = faster >= 1.5 and drop <= 1.0
    state = ("pass" if held else "FAIL") if must_hold else ("holds" if held else "not met; no floor without fine-tuning")
    return f"`{name}`: {faster:.2f}x faster at batch 1 (p50), {drop:+.2f} pt ({state})"


def mlp_case(work: Path) -> str:
    import torch

    from compressor_onnx.samples import digits_split

    split = digits_split()
    torch.manual_seed(0)
    module = train_classifier(wide_mlp(), torch.from_numpy(split.train_x), torch.from_numpy(split.train_y))
    torch.save(module.state_dict(), work / "mlp.pt")
    np.savez(work / "mlp-eval.npz", x=split.test_x, y=split.test_y)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    np.savez(work / "mlp-train.npz", x=split.train_x, y=split.train_y)
    variants = run(work / "mlp.pt", MLP_RECIPE, work, "--set", f"model_factory={FACTORY}",
                   "--data", str(work / "mlp-eval.npz"), "--train-data", str(work / "mlp-train.npz"), env=env)
    pruned = variants["channel50"]["metadata"]["channel_pruning"]["pruned"]
    tuning = variants["channel50"]["metadata"]["fine_tuning"]
    return f"""### digits MLP, onnx backend (fine-tuned {MLP_EPOCHS} epochs on the training split)

A 64-{HIDDEN}-{HIDDEN}-10 torch MLP (Linear + ReLU) trained 40 epochs on 75% of scikit-learn's digits,
loaded as a state_dict; {len(split.test_y)} held-out images. `channel50` narrows
{', '.join(f"{e['layer']} {e['channels']} -> {e['kept']}" for e in pruned)} (the last Linear feeds
the output and keeps its 10 classes), so the three Gemms do 1/2, 1/4 and 1/2 of their FLOPs, then
fine-tunes the torch model with the removed neurons masked, {MLP_EPOCHS} epochs on the
{len(split.train_y)} training images (AdamW {tuning['learning_rate']:g}, {tuning['loss']} against the unpruned
model, {tuning['seconds']:.1f} s), and exports it again; `channel50-one-shot` is the same without fine-tuning.

{markdown_table(CLASSIFIER_HEADER, classifier_rows(variants, 1000))}

{verdict(variants, "channel50", must_hold=True)}.
"""


def cnn_case(work: Path) -> tuple[str, bool]:
    from bench_tflite import trained_digits_cnn

    model, train_x, train_y, test_x, test_y = trained_digits_cnn()
    model.save(work / "cnn.keras")
    np.savez(work / "cnn-train.npz", x=train_x, y=train_y)
    np.savez(work / "cnn-eval.npz", x=test_x, y=test_y)
    variants = run(work / "cnn.keras", CNN_RECIPE, work, "--train-data", str(work / "cnn-train.npz"),
                   "--data", str(work / "cnn-eval.npz"))
    facts = variants["channel50"]["metadata"]["channel_pruning"]
    base, metrics = variants["original"]["metrics"], variants["channel50"]["metrics"]
    held = speed(base, metrics) >= 1.5 and (base["accuracy"] - metrics["accuracy"]) * 100 <= 1.0
    return f"""### digits CNN, tflite backend (fine-tuned {CNN_EPOCHS} epochs on the training split)

The Keras CNN of `bench_tflite.py` (Conv2D 32, Conv2D 64, max-pool, Dense 128, dropout, Dense 10;
{facts['parameters_before']:,} parameters) trained 30 epochs on 70% of the digits; 540 held-out
images. `channel50` keeps {', '.join(f"{e['layer']} {e['kept']}/{e['channels']}" for e in facts['pruned'])}
({facts['parameters_after']:,} parameters) and fine-tunes {CNN_EPOCHS} epochs (Adam 1e-3);
`channel50-one-shot` is the same without fine-tuning.

{markdown_table(CLASSIFIER_HEADER, classifier_rows(variants, 1000))}

Floor (>= 1.5x faster at batch 1, <= 1 pt drop, fine-tuned): {verdict(variants, "channel50", must_hold=True)}.
""", held


def minilm_case(work: Path) -> tuple[str, bool]:
    from bench_onnx_minilm import SENTENCES, SEQUENCE, model_folder, sentences, tokenize
    from bench_onnx_techniques import tokenize as tokenize_to

    folder = model_folder()
    data = SHARED / "data" / "debian-descriptions"
    tokenize(folder, sentences(data / "test.txt", SENTENCES), work / "minilm-eval.npz")
    tokenize_to(folder, sentences(data / "train.txt", TRAIN_SENTENCES), work / "minilm-train.npz", TRAIN_TOKENS)
    variants = run(folder, MINILM_RECIPE, work, "--data", str(work / "minilm-eval.npz"),
                   "--train-data", str(work / "minilm-train.npz"))
    base = variants["original"]["metrics"]
    rows, floors, held = [], [], True
    for name, variant in variants.items():
        metrics = variant["metrics"]
        facts = variant["metadata"].get("lowrank", {})
        factorized = facts.get("factorized", [])
        removed = [1 - e["rank"] * sum(e["shape"]) / (e["shape"][0] * e["shape"][1]) for e in factorized]
        ranks = sorted(e["rank"] for e in factorized)
        faster = speed(base, metrics, "p50_fastest_window")
        rows.append([
            name, f"{len(factorized)}" if factorized else "-",
            f"{ranks[0]}-{ranks[-1]}" if ranks else "-",
            f"{min(removed) * 100:.0f}-{max(removed) * 100:.0f}%" if removed else "-",
            f"{metrics['size_bytes'] / 1e6:.1f}", f"{metrics['latency_ms']['p50']:.1f}",
            f"{speed(base, metrics):.2f}x", f"{metrics['latency_ms']['p50_fastest_window']:.1f}", f"{faster:.2f}x",
            f"{metrics.get('cosine', {}).get('mean', 1.0):.4f}", f"{metrics.get('cosine', {}).get('min', 1.0):.4f}",
            f"{metrics.get('agreement', 1.0):.3f}",
        ])
        if removed and max(removed) >= 0.4 and "quantize" not in json.dumps(variant["steps"]):
            ok = faster > 1.0
            held &= ok
            floors.append(f"`{name}` removes up to {max(removed) * 100:.0f}% of a layer's FLOPs: "
                          f"{faster:.2f}x by fastest-window p50 ({'pass' if ok else 'FAIL'})")
        if removed and max(removed) < 0.4 and "quantize" not in json.dumps(variant["steps"]):
            floors.append(f"`{name}` removes at most {max(removed) * 100:.0f}% of a layer's FLOPs (under 40%: "
                          f"no floor), {faster:.2f}x")
    table = markdown_table(
        ["variant", "FFN layers factorized", "ranks", "FLOPs removed per layer", "MB", "p50 ms (b1, s128)",
         "faster", "fastest-window p50 ms", "faster (fastest window)", "cosine mean", "cosine min",
         "NN agreement"], rows)
    return f"""### all-MiniLM-L6-v2, onnx backend: `lowrank` on the feed-forward layers

`layers={FFN}`: the 12 feed-forward MatMuls (384x1536 and 1536x384; attention is left alone).
`lowrank90-tuned`: the same factorization, then the factorized torch model trained with `{TUNE}` on
{TRAIN_SENTENCES} unlabelled train.txt sentences ({TRAIN_TOKENS} tokens) to match the original's hidden
states; the other variants are one-shot.
{SENTENCES} real sentences (debian-descriptions test.txt) padded to {SEQUENCE} tokens; cosine is
between mean-pooled sentence embeddings and fp32's; NN agreement: the share of sentences whose nearest
neighbour among the {SENTENCES} is the same as with fp32. FLOPs removed per layer: 1 - r(n+m)/(nm).

{table}

Floor (a measured latency gain where >= 40% of a layer's FLOPs go): {'; '.join(floors) or 'n/a'}.
""", held


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="mlp,cnn,minilm")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    chosen = set(args.only.split(","))
    sections, failures = [], []
    with tempfile.TemporaryDirectory(prefix="bench-techniques-") as scratch:
        work = Path(scratch)
        if "mlp" in chosen:
            sections.append(mlp_case(work))
        if "cnn" in chosen:
            text, held = cnn_case(work)
            sections.append(text)
            failures += [] if held else ["cnn"]
        if "minilm" in chosen:
            text, held = minilm_case(work)
            sections.append(text)
            failures += [] if held else ["minilm"]
    markdown = (
        "## Structured compression: channel pruning and low-rank (`benchmarks/bench_techniques.py`)\n\n"
        f"Every variant through `compressor run` (fresh measuring subprocesses, 1 thread, 3 interleaved repeats, "
        f"medians). CPU: {cpu_line()}.\n\n" + "\n".join(sections) + "\n"
        + machine(("torch", "onnx", "onnxruntime", "transformers", "tensorflow-cpu", "ai-edge-litert")) + "\n"
    )
    print(markdown)
    if not args.no_write:
        write_section("techniques", markdown)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
