"""onnxruntime-genai's model builder as the onnx backend's ``export genai`` and its generator
as a runtime: a tiny Llama (grouped-query attention, rotary positions) trained a few steps
in-test, built by the builder, run by onnxruntime-genai, compared with transformers, and
measured beside compressor's own export in one ``compressor run``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import compressor_onnx.genai_child as genai_child
import compressor_onnx.plugin as plugin
from compressor.cli import cli
from compressor.errors import CompressionError
from compressor.generation import generate, window_perplexity
from compressor.memory import PeakRss
from compressor.plugin import (
    Context,
    MeasureSettings,
    Model,
    Step,
    TokenDecoder,
    UnsupportedError,
    UsageError,
)
from compressor_onnx.genai import GENAI_FORMAT, GenaiPlan, check_export_steps, genai_step
from compressor_onnx.genai_build import save_genai
from compressor_onnx.genai_runtime import GenaiRuntime

TEXT = [f"the quick brown fox number {i} jumps over the lazy dog and runs into the forest" for i in range(60)]
VOCABULARY = 512


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer Llama with a byte-level BPE tokenizer, trained on the sentences so that its
    next token is no coin toss; and its token ids as data (``ids.npz`` beside it)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("genai") / "llama"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                                     eos_token="<|endoftext|>")
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCABULARY,
                                      max_position_embeddings=128, initializer_range=0.05)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.tensor(tokenizer(TEXT[:16])["input_ids"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(30):
            optimizer.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rows = tokenizer(TEXT[20:32])["input_ids"]
    np.savez(folder.parent / "ids.npz", input_ids=np.array(rows, dtype=np.int64),
             attention_mask=np.ones((len(rows), len(rows[0])), dtype=np.int64))
    return folder


@pytest.fixture(scope="module")
def built_fp32_and_peak(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, int | None]:
    """The builder's fp32 folder, and the peak RSS of a block around its making."""
    destination = tmp_path_factory.mktemp("built") / "genai"
    with PeakRss() as peak:
        artifact = save_genai(GenaiPlan(llama), destination, Context())
    return artifact, peak.bytes


@pytest.fixture(scope="module")
def built_fp32(built_fp32_and_peak: tuple[Any, int | None]) -> Any:
    return built_fp32_and_peak[0]


def transformers_logits(folder: Path, ids: Any) -> Any:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids, dtype=np.int64)[None])).logits[0].numpy()


def transformers_greedy(folder: Path, prompt: Any, new_tokens: int) -> list[int]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor(np.asarray(prompt, dtype=np.int64)[None]), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return [int(token) for token in out[0, len(prompt):]]


class TransformersDecoder(TokenDecoder):
    """Prefills by transformers (all that window perplexity calls)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def prefill(self, ids: Any) -> Any:
        return transformers_logits(self.folder, ids)


def test_the_builders_fp32_folder_generates_what_transformers_generates(llama: Path, built_fp32: Any) -> None:
    assert built_fp32.format == GENAI_FORMAT and built_fp32.path.is_dir()
    assert {"model.onnx", "genai_config.json", "tokenizer.json"} <= set(built_fp32.metadata["genai_files"])
    runtime = GenaiRuntime(built_fp32, MeasureSettings(threads=1))
    try:
        decoder = runtime.token_decoder()
        prompt = np.load(llama.parent / "ids.npz")["input_ids"][0, :12]
        generated = generate(decoder, prompt, 12)
        assert generated.tokens == transformers_greedy(llama, prompt, 12)
        # The prefill gives the logits of every position (what perplexity needs), as transformers does.
        stream = np.load(llama.parent / "ids.npz")["input_ids"].reshape(-1)[:40]
        expected = transformers_logits(llama, stream)
        assert np.abs(decoder.prefill(stream) - expected).max() < 1e-4
        # A decode step after that prefill is the next position's logits.
        longer = transformers_logits(llama, np.append(stream, 7))
        assert np.abs(decoder.decode(7) - longer[-1]).max() < 1e-4
        # Window perplexity as transformers' logits give it, to float32 rounding.
        perplexity, top1, scored = window_perplexity(decoder, stream, 16)
        reference, reference_top1, _ = window_perplexity(TransformersDecoder(llama), stream, 16)
        assert scored == 39 and top1 == reference_top1 and 1 < perplexity < VOCABULARY
        assert abs(perplexity / reference - 1) < 1e-5
        # One pass of a batch: each row its own sequence, left padding left out.
        mask = np.ones((2, 12), dtype=np.int64)
        mask[1, :4] = 0
        batch = runtime.run({"input_ids": np.stack([stream[:12], stream[:12]]), "attention_mask": mask})["logits"]
        assert np.abs(batch[0] - expected[:12]).max() < 1e-4
        assert np.abs(batch[1, 4:] - transformers_logits(llama, stream[4:12])).max() < 1e-4
        assert not batch[1, :4].any()
        # A token reads every weight but the embedding table (read a row at a time by Gather).
        data_bytes, table_bytes = (built_fp32.path / "model.onnx.data").stat().st_size, VOCABULARY * 64 * 4
        assert data_bytes - table_bytes - 16384 <= decoder.weight_bytes <= data_bytes - table_bytes
        assert decoder.max_positions == 128
    finally:
        runtime.close()


def test_the_builder_runs_in_a_process_of_its_own_whose_peak_counts(built_fp32_and_peak: tuple[Any, int | None]
                                                                     ) -> None:
    artifact, block_peak = built_fp32_and_peak
    # Not imported here: the builder (and the transformers model it loads) lived in its child.
    assert "onnxruntime_genai.models.builder" not in sys.modules
    builder_peak = artifact.metadata["genai_builder_peak_rss_bytes"]
    # The child imported torch and transformers and loaded the model: well above an empty interpreter.
    assert 100 * 2**20 < builder_peak < 8 * 2**30
    assert block_peak is not None and block_peak >= builder_peak


def test_int4_reads_the_float_weights_from_disk_and_writes_what_the_builder_alone_writes(
        llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The builder quantizes a graph whose weights it reads from a file in the cache folder, not
    the transformers tensors it loaded: the same bytes, the working folder and the builder as they
    were."""
    import onnxruntime_genai.models.builder as builder

    original = genai_child.builders_model_class().to_nbits
    monkeypatch.chdir(tmp_path)
    request = {"source": str(llama), "precision": "int4", "options": ["hf_token=false", "block_size=32"]}
    written = {}
    for way in ("alone", "from-disk"):
        output, cache = tmp_path / way, tmp_path / f"{way}-cache"
        if way == "alone":
            options = builder.parse_extra_options(None, str(llama), str(output), "int4", "cpu", str(cache),
                                                  request["options"])
            builder.create_model(None, str(llama), str(output), "int4", "cpu", str(cache), **options)
        else:
            genai_child.build({**request, "output": str(output), "cache": str(cache)})
            assert (cache / "float-weights" / "float.onnx.data").stat().st_size > 4 * 64 * 128 * 2
            assert genai_child.builders_model_class().to_nbits is original
        written[way] = {path.name: path.read_bytes() for path in sorted(output.iterdir())}
    assert Path.cwd() == tmp_path
    assert written["alone"].keys() == written["from-disk"].keys() and "model.onnx.data" in written["alone"]
    assert written["alone"] == written["from-disk"]


def test_a_builder_failure_is_one_line_with_its_traceback_for_debug(llama: Path, tmp_path: Path,
                                                                   private_tmpdir: Path) -> None:
    destination = tmp_path / "genai"
    with pytest.raises(CompressionError) as failed:
        save_genai(GenaiPlan(llama, options=(("state_window", "-1"),)), destination, Context())
    message = str(failed.value)
    assert message.startswith("onnxruntime-genai's builder failed: state_window must be a non-negative integer. "
                              "(it printed last: Extra options: ")
    assert "\n" not in message and failed.value.exit_code == 7
    # --debug shows the builder's traceback, from its own process.
    [traceback] = failed.value.plugin_tracebacks
    assert traceback.startswith("onnxruntime-genai's builder (in its own process):\nTraceback")
    assert "check_extra_options" in traceback and traceback.endswith(
        "ValueError: state_window must be a non-negative integer.")
    assert list(private_tmpdir.iterdir()) == []  # the scratch folder, its cache and the child's TMPDIR gone


def test_what_the_builder_cannot_export_is_unsupported(llama: Path, tmp_path: Path, private_tmpdir: Path) -> None:
    # The builder's NotImplementedError (here: int8 in the QDQ format) is exit 5, naming the folder.
    plan = GenaiPlan(llama, precision="int8", options=(("use_qdq", "true"),))
    with pytest.raises(UnsupportedError) as refused:
        save_genai(plan, tmp_path / "genai", Context())
    assert str(refused.value) == (f"{llama}: onnxruntime-genai's builder: int8 precision does not support the QDQ "
                                  "format (use_qdq). Use QOperator (the default).")
    assert refused.value.exit_code == 5 and "NotImplementedError" in refused.value.plugin_tracebacks[0]
    assert list(private_tmpdir.iterdir()) == []


def test_int4_takes_the_settings_the_user_gave_and_leaves_the_builders_defaults(llama: Path) -> None:
    model = Model("onnx", llama, "torch", None)
    export = genai_step(model, Step("export", {"mode": "genai", "builder_options": "algo_config=rtn"}),
                        Context())
    quantize = Step("quantize", {"mode": "int4", "block_size": "64", "symmetric": False, "accuracy_level": 4},
                    defaulted=frozenset({"accuracy_level"}))
    # A variant tree forks the exported plan for each step after it (the plan is immutable).
    forked = plugin.compressor_fork(model=export, context=Context())
    assert forked.format == GENAI_FORMAT and forked.handle == export.handle and forked is not export
    plan = plugin.compressor_compress(model=forked, step=quantize, context=Context()).handle
    assert plan.precision == "int4" and export.handle.precision == "fp32"
    assert plan.options == (("block_size", "64"), ("is_symmetric", "false"), ("algo_config", "rtn"))


def test_what_export_genai_cannot_do_is_refused_before_work(llama: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    model = Model("onnx", llama, "torch", None)
    genai = Step("export", {"mode": "genai"})
    assert check_export_steps(model, [genai, Step("quantize", {"mode": "int4"})]) == []
    with pytest.raises(UnsupportedError, match="'quantize dynamic' cannot follow 'export genai'"):
        check_export_steps(model, [genai, Step("quantize", {"mode": "dynamic"})])
    with pytest.raises(UsageError, match="must be the variant's first step"):
        check_export_steps(model, [Step("quantize", {"mode": "int4"}), genai])
    with pytest.raises(UsageError, match="'fast' is not KEY=VALUE"):
        check_export_steps(model, [Step("export", {"mode": "genai", "builder_options": "fast"})])
    # compressor's own export leaves the other steps to the backend's checks.
    rest = [Step("quantize", {"mode": "dynamic"})]
    assert check_export_steps(model, [Step("export", {"mode": "compressor"}), *rest]) == rest
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UnsupportedError, match="needs the model's tokenizer in the folder"):
        check_export_steps(Model("onnx", gpt2, "torch", None), [genai])
    (gpt2 / "tokenizer.json").write_text((llama / "tokenizer.json").read_text())
    with pytest.raises(UnsupportedError, match="does not export GPT2LMHeadModel; it exports .*LlamaForCausalLM"):
        check_export_steps(Model("onnx", gpt2, "torch", None), [genai])
    with pytest.raises(UnsupportedError, match="from a Hugging Face transformers folder"):
        check_export_steps(Model("onnx", tmp_path / "m.onnx", "onnx", None), [genai])
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # as if it were not installed
    with pytest.raises(UnsupportedError, match=r"needs the onnxruntime-genai package: pip install") as refused:
        check_export_steps(model, [genai])
    assert refused.value.exit_code == 5


def test_one_run_measures_compressors_int4_and_the_builders_side_by_side(llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [str(arg) for arg in (
        "run", llama, "--backend", "onnx", "--export", "compressor", "--export", "genai", "-q", "int4",
        "--data", llama.parent / "ids.npz", "--min-seconds", "0", "--precision", "off", "--max-examples", "4",
        "--set", "prompt_tokens=12",
        "--set", "new_tokens=6", "--set", "generation_prompts=2", "--set", "perplexity_window=32",
        "--set", "memory_bandwidth_gbs=10", "-o", out)])
    assert result.exit_code == 0, result.output
    variants = {variant["name"]: variant for variant in json.loads((out / "report.json").read_text())["variants"]}
    assert list(variants) == ["original", "compressor-int4", "genai-int4"]
    assert variants["genai-int4"]["steps"] == ["export genai", "quantize int4"]
    for name in ("compressor-int4", "genai-int4"):
        metrics = variants[name]["metrics"]
        assert 0 < metrics["ttft_ms"] < 10_000 and 0 < metrics["decode_tokens_per_s"] < 1e6
        assert 0 <= metrics["greedy_exact"] <= metrics["greedy_agreement"] <= 1
        assert math.isfinite(metrics["window_perplexity"]) and metrics["window_perplexity"] > 1
        assert metrics["perplexity_scored_tokens"] == variants["original"]["metrics"]["perplexity_scored_tokens"]
        assert 0.5 < metrics["next_token_agreement"] <= 1
    genai = variants["genai-int4"]["metrics"]
    assert genai["runtime"].startswith("onnxruntime-genai ")
    assert genai["decode_weight_bytes"] < variants["original"]["metrics"]["decode_weight_bytes"] / 2
    table = result.output[result.output.index("generation (batch 1, 12-token prompts, 6 new tokens"):]
    assert "\ncompressor-int4 " in table and "\ngenai-int4 " in table
    # The builder's folder is published as it is: onnxruntime-genai opens it.
    import onnxruntime_genai as og

    assert (out / "genai-int4" / "genai_config.json").is_file()
    # A folder's size is every file inside it.
    inside = sum(path.stat().st_size for path in (out / "genai-int4").rglob("*") if path.is_file())
    assert genai["size_bytes"] == inside > 0
    assert genai["kl_divergence"] >= 0 and variants["compressor-int4"]["metrics"]["kl_divergence"] >= 0
    assert og.Model(str(out / "genai-int4")) is not None


def test_help_offers_export_and_imports_no_framework() -> None:
    probe = ("import sys\nfrom compressor.cli import cli\n"
             "try:\n    cli(['run', '--help'], prog_name='compressor')\nexcept SystemExit:\n    pass\n"
             "print('HEAVY', [m for m in ('onnxruntime_genai', 'onnxruntime', 'torch', 'transformers') "
             "if m in sys.modules])\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--export EXPORTER" in result.stdout and "HEAVY []" in result.stdout, result.stdout[-800:]
