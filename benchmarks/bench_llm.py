"""Causal language models as they are deployed: exported with a key/value cache, quantized,
measured generating (issue 27).

(a) A byte-level GPT-2-style model (no tokenizer: token = byte) trained for ``--train-seconds``
    on ``../shared/data/debian-descriptions/train.txt``, so that perplexity means something;
    scored on ``test.txt``.
(b) A Llama-style model with rotary positions and grouped-query attention, random weights,
    for speed and memory (``--llama small``: about 150 M parameters; ``--llama 1b``: about
    1.1 B, which needs some 15 GB of memory and a long while on a 2-core machine).

For each: fp32, dynamic int8, int4 RTN (ONNX Runtime, MatMulNBits accuracy_level 4), int4 GPTQ and
AWQ and static int8 (for (a) calibrated on train.txt, for (b) on other random prompts), through
``compressor run``: file size, time to first token, decode tokens/s and its share of the
memory-bandwidth bound, perplexity (sliding window), greedy-generation agreement.

    nice -n 10 python benchmarks/bench_llm.py --train-seconds 180 --llama small
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SHARED, compressor_cli, machine, markdown_table, write_section  # noqa: E402

DATA = SHARED / "data" / "debian-descriptions"
CONTEXT = 256
#: Bytes per training sequence of (a): positions past it are untrained, so (a) is scored with
#: a window of this length and generates within it.
TRAIN_LENGTH = 128
LLAMA = {
    "small": {"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4,
              "intermediate_size": 2816, "vocab_size": 32000},
    "1b": {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
           "intermediate_size": 5632, "vocab_size": 32000},
}


def text_bytes(path: Path, limit: int) -> Any:
    """The file's descriptions as bytes (the ``__label__x`` prefixes left out), at most ``limit``."""
    import numpy as np

    lines = []
    total = 0
    with open(path, encoding="utf-8", errors="replace") as stream:
        for line in stream:
            words = line.split(" ", 1)
            text = (words[1] if len(words) > 1 and words[0].startswith("__label__") else line).strip() + "\n"
            encoded = text.encode("utf-8")
            lines.append(encoded)
            total += len(encoded)
            if total >= limit:
                break
    return np.frombuffer(b"".join(lines)[:limit], dtype=np.uint8).astype(np.int64)


def train_gpt2(folder: Path, seconds: float) -> dict[str, Any]:
    """A byte-level GPT-2 (4 layers, 256 wide) trained for ``seconds`` on train.txt."""
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=256, n_positions=CONTEXT,
                                     bos_token_id=10, eos_token_id=10)
    model = transformers.GPT2LMHeadModel(config)
    stream = torch.from_numpy(text_bytes(DATA / "train.txt", 20_000_000))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    started, steps, loss = time.perf_counter(), 0, float("nan")
    model.train()
    while time.perf_counter() - started < seconds:
        starts = torch.randint(0, len(stream) - TRAIN_LENGTH - 1, (16,), generator=generator)
        batch = torch.stack([stream[start: start + TRAIN_LENGTH] for start in starts])
        output = model(input_ids=batch, labels=batch)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        steps, loss = steps + 1, float(output.loss.detach())
    model.eval().save_pretrained(folder, safe_serialization=True)
    parameters = sum(p.numel() for p in model.parameters())
    return {"steps": steps, "train_loss": loss, "parameters": parameters, "seconds": seconds}


def random_llama(folder: Path, size: str) -> dict[str, Any]:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**LLAMA[size], max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    small_tokenizer(folder)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def small_tokenizer(folder: Path) -> None:
    """A 1,000-token byte-level BPE trained on train.txt, saved beside the model: onnxruntime-genai's
    builder and the GGUF converter want one (the benchmark feeds token ids, so its size does not matter)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    lines = bytes(text_bytes(DATA / "train.txt", 2_000_000).astype("uint8")).decode("utf-8", "replace").splitlines()
    bpe.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(folder)


def token_rows(ids: Any, rows: int, length: int) -> Any:
    import numpy as np

    usable = min(rows, len(ids) // length)
    return np.ascontiguousarray(ids[: usable * length].reshape(usable, length))


#: The variants of each model; with a calibration file also the calibrated ones (int4 GPTQ and AWQ, static int8).
VARIANTS = ('[variants.dynamic]\nsteps = ["quantize dynamic"]\n'
            '[variants.int4]\nsteps = ["quantize int4"]\n')
#: (b): compressor's int4 at its default for language models (blocks of 128) and at the builder's (32), and
#: the builder's at its default (32) and at 128, all in one run beside each other.
BUILDER_VARIANTS = ('[variants.int4-b32]\nsteps = ["quantize int4 block_size=32"]\n'
                    '[variants.genai-int4]\nsteps = ["export genai", "quantize int4"]\n'
                    '[variants.genai-int4-b128]\nsteps = ["export genai", "quantize int4 block_size=128"]\n')
CALIBRATED_VARIANTS = ('[variants.int4-gptq]\nsteps = ["quantize int4 algorithm=gptq"]\n'
                       '[variants.int4-awq]\nsteps = ["quantize int4 algorithm=awq"]\n'
                       '[variants.int8-static]\nsteps = ["quantize int8"]\n')


def measure(folder: Path, data: Path, out: Path, options: list[str], threads: int,
            calibration: Path | None = None, techniques: list[str] | None = None,
            more_variants: str = "") -> list[dict[str, Any]]:
    """``compressor run`` with the recipe's variants (and ``more_variants``), or with ``techniques``
    (CLI options) instead."""
    if techniques is None:
        recipe = out.with_suffix(".toml")
        recipe.write_text(VARIANTS + (CALIBRATED_VARIANTS if calibration is not None else "") + more_variants)
        techniques = ["--recipe", str(recipe)]
    args = ["run", str(folder), *techniques, "--data", str(data), "--threads", str(threads),
            "--min-seconds", "0.5", "-o", str(out), "--quiet", "--no-cache"]  # every figure measured now
    if calibration is not None:
        args += ["--calibration-data", str(calibration)]
    for option in options:
        args += ["--set", option]
    compressor_cli(*args)
    report = json.loads((out / "report.json").read_text())
    return report["variants"]


def process_peaks(variant: dict[str, Any], weights_bytes: float) -> str:
    """The peak resident memory of each process that worked on ``variant``, over the fp32 weights
    W: reading (and exporting) the model, compressing it, measuring it."""
    metrics, metadata = variant.get("metrics", {}), variant.get("metadata", {})
    peaks = [("load", metrics.get("load_peak_rss_bytes")), ("export", metadata.get("export_peak_rss_bytes")),
             ("compress", metrics.get("compress_peak_rss_bytes")), ("builder", metadata.get("genai_builder_peak_rss_bytes")),
             ("measure", metrics.get("measure_peak_rss_bytes"))]
    return ", ".join(f"{label} {value / weights_bytes:.2f}" for label, value in peaks
                     if isinstance(value, (int, float)) and weights_bytes > 0)


def rows_of(name: str, variants: list[dict[str, Any]], weights_bytes: float | None = None) -> list[list[str]]:
    """One table row per variant; ``weights_bytes``: W, the fp32 weights (default: the first
    variant's file, the original)."""
    rows = []
    if weights_bytes is None and variants:
        weights_bytes = variants[0].get("metrics", {}).get("size_bytes", 0)
    for variant in variants:
        metrics = variant.get("metrics", {})
        if variant.get("error"):
            rows.append([name, variant["name"], f"failed: {variant['error']}"] + [""] * 9)
            continue
        rows.append([
            name, variant["name"], f"{metrics['size_bytes'] / 1e6:.1f} MB", f"{metrics['ttft_ms']:.1f}",
            f"{metrics['decode_tokens_per_s']:.1f}",
            f"{metrics.get('bandwidth_share', float('nan')):.0%} of {metrics.get('decode_bound_tokens_per_s', 0):.0f}"
            f" ({metrics.get('memory_bandwidth_gbs', 0):.1f} GB/s)",
            f"{metrics['measure_peak_rss_bytes'] / 2**20:.0f} MB",
            f"{metrics.get('window_perplexity', float('nan')):.3f}",
            f"{metrics.get('greedy_agreement', float('nan')):.2f} / {metrics.get('greedy_exact', float('nan')):.2f}",
            f"{metrics.get('next_token_agreement', float('nan')):.3f}",
            f"{metrics['kl_divergence']:.4f}" if isinstance(metrics.get("kl_divergence"), float) else "-",
            process_peaks(variant, weights_bytes or 0),
        ])
    return rows


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-seconds", type=float, default=180)
    parser.add_argument("--llama", choices=("small", "1b", "none"), default="small")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-gpt2", action="store_true", help="leave out (a), the trained GPT-2")
    parser.add_argument("--write-doc", action="store_true", help="replace the llm section of docs/benchmarks.md")
    args = parser.parse_args()
    generation = [f"prompt_tokens={args.prompt_tokens}", f"new_tokens={args.new_tokens}"]
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as work:
        root = Path(work)
        if not args.no_gpt2:
            facts = train_gpt2(root / "gpt2", args.train_seconds)
            test_ids = token_rows(text_bytes(DATA / "test.txt", 64 * CONTEXT), 64, CONTEXT)
            np.savez(root / "test.npz", input_ids=test_ids)
            # GPTQ and AWQ calibrate on the last 32 x 256 bytes of train.txt's first 20 MB (not test text).
            train_ids = text_bytes(DATA / "train.txt", 20_000_000)[-32 * CONTEXT:]
            np.savez(root / "train.npz", input_ids=token_rows(train_ids, 32, CONTEXT))
            # Prompt and generation within the trained length.
            short = [f"prompt_tokens={TRAIN_LENGTH - args.new_tokens // 2}", f"new_tokens={args.new_tokens // 2}"]
            notes.append(f"(a) byte-level GPT-2, {facts['parameters'] / 1e6:.1f} M parameters, trained "
                         f"{facts['seconds']:.0f} s ({facts['steps']} steps of 16 x {TRAIN_LENGTH} bytes, last loss "
                         f"{facts['train_loss']:.2f} nats/byte); scored on {test_ids.size} bytes of test.txt "
                         f"(window {TRAIN_LENGTH}, the trained length; 1024 bytes scored); prompts of "
                         f"{TRAIN_LENGTH - args.new_tokens // 2} bytes, {args.new_tokens // 2} generated")
            rows += rows_of("(a) GPT-2 bytes", measure(root / "gpt2", root / "test.npz", root / "out-gpt2",
                                                         [*short, f"perplexity_window={TRAIN_LENGTH}", "batch_seconds=2"],
                                                         args.threads, root / "train.npz"))
        print(markdown_table(HEADER, rows), flush=True)
        if args.llama != "none":
            facts = random_llama(root / "llama", args.llama)
            random_ids = np.random.default_rng(0).integers(3, 32000, size=(24, args.prompt_tokens)).astype(np.int64)
            np.savez(root / "llama.npz", input_ids=random_ids[:8])
            np.savez(root / "llama-calibration.npz", input_ids=random_ids[8:])
            notes.append(f"(b) Llama-style ({args.llama}: {LLAMA[args.llama]}), {facts['parameters'] / 1e6:.0f} M "
                         "parameters, random weights and random prompts: speed and memory only")
            options = [*generation, "perplexity_tokens=256", "generation_prompts=2", "batch_seconds=2"]
            # onnxruntime-genai's builder in the same run, where it is installed.
            builder = BUILDER_VARIANTS if find_spec("onnxruntime_genai") else ""
            if not builder:
                notes.append("(b) onnxruntime-genai is not installed: no builder row")
            rows += rows_of(f"(b) Llama {args.llama}", measure(
                root / "llama", root / "llama.npz", root / "out-llama", options, args.threads,
                root / "llama-calibration.npz", more_variants=builder))
            # The same model by llama.cpp (its original: the f32 GGUF).
            variants = measure(root / "llama", root / "llama.npz", root / "out-llama.cpp", options, args.threads,
                               techniques=["--backend", "gguf", "-q", "q8_0", "-q", "q4_k_m"])
            rows += rows_of(f"(b) Llama {args.llama}, llama.cpp", variants, variants[0]["metrics"].get("size_bytes"))
    table = markdown_table(HEADER, rows)
    print(table)
    print("\n".join(notes))
    text = "\n".join([
        "## Language models generating (`benchmarks/bench_llm.py`)", "", machine(["onnxruntime", "torch",
                                                                               "transformers"]),
        f"Threads: {args.threads}. Prompt {args.prompt_tokens} tokens, {args.new_tokens} generated greedily, "
        "batch 1; decode share: tokens/s over memory bandwidth (copy benchmark) / file bytes.", "",
        *[f"- {note}" for note in notes], "", table,
    ])
    if args.write_doc:
        write_section("llm", text)


HEADER = ("model", "variant", "size", "TTFT ms", "decode tok/s", "share of bound tok/s (bandwidth)", "peak RSS",
          "perplexity", "greedy agree / exact", "top-1 agree", "KL nats", "process peaks / W")


if __name__ == "__main__":
    main()
