"""Models past 2 GB through `compressor run`, in bounded memory.

(a) an ONNX MLP of 36 MatMul + Relu layers of 4096 x 4096 fp32 (2.4 GB of
weights in one external data file, saved with ``onnx.save(...,
save_as_external_data=True)``), ``-q dynamic -q fp16 -q int8`` (static int8
goes through ONNX Runtime's ``quantize_static`` on a copy in the scratch folder); ONNX Runtime's own
``quantize_dynamic(..., use_external_data_format=True)`` runs on the same file
in a child process for comparison. (b) a GPT-2-shaped transformers folder with
random weights (``GPT2Config(n_layer=16, n_embd=2048, n_head=16)``, 0.9 B
parameters, safetensors), ``-q dynamic``.

Every number comes from the run's report.json (core records each phase's wall
time and peak RSS; the plugin records the export's) or from the child's own
``VmHWM``. Big files go under ``--folder`` (default /work/bigtmp) and are deleted
afterwards. :func:`mlp_dynamic_run` (the MLP ``-q dynamic`` end to end with its disk peak,
sampled by :class:`DiskSampler`) is what ``bench_time.py --only mlp`` runs. Run:
``.venv/bin/python benchmarks/bench_big.py`` (``--layers 8
--no-gpt2 --no-write`` for a quick smaller run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, write_section  # noqa: E402

DISTRIBUTIONS = ("torch", "onnx", "onnxruntime", "transformers")
FLOORS = {"size_ratio": 3.5, "compress_rss": 1.5}
GPT2 = {"n_layer": 16, "n_embd": 2048, "n_head": 16}
EVAL_ROWS, SEQUENCE = 8, 16


def build_mlp(path: Path, layers: int, width: int) -> None:
    """The issue's model: MatMul + Relu layers, weights in one external data file."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, current = [], [], "x"
    for index in range(layers):
        # He-scaled so activations keep their size through 36 Relu layers.
        weight = rng.standard_normal((width, width), dtype=np.float32) * np.float32(np.sqrt(2 / width))
        weights.append(numpy_helper.from_array(weight, f"w{index}"))
        output = "y" if index == layers - 1 else f"h{index}"
        nodes += [helper.make_node("MatMul", [current, f"w{index}"], [f"m{index}"], name=f"matmul{index}"),
                  helper.make_node("Relu", [f"m{index}"], [output], name=f"relu{index}")]
        current = output
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path), save_as_external_data=True, location=f"{path.name}.data")
    x = rng.standard_normal((EVAL_ROWS, width), dtype=np.float32)
    np.savez(path.with_name("x.npz"), x=x)


def build_gpt2(folder: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, size=(4, SEQUENCE)).astype(np.int64)
    np.savez(folder.parent / "tokens.npz", input_ids=ids, attention_mask=np.ones_like(ids),
             token_type_ids=np.zeros_like(ids))


def direct_ort(model: Path, target: Path) -> None:
    """ONNX Runtime's quantize_dynamic called directly, as compressor's defaults set it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    quantize_dynamic(model, target, weight_type=QuantType.QInt8, per_channel=True,
                     use_external_data_format=True)
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_bytes": vm_hwm()}))


def vm_hwm() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def child(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def compressor_run(model: Path, out: Path, scratch: Path, *args: str,
                   min_seconds: str | None = "0") -> tuple[dict[str, Any], float]:
    """``compressor run`` in a child process whose scratch files go to ``scratch``
    (``min_seconds``: ``--min-seconds``, None for the default)."""
    scratch.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timing = ("--min-seconds", min_seconds) if min_seconds is not None else ()
    child("-m", "compressor", "run", str(model), "-o", str(out), *timing, *args,
          env={"TMPDIR": str(scratch)})
    return json.loads((out / "report.json").read_text()), time.perf_counter() - started


class DiskSampler:
    """Bytes on disk (allocated blocks, each inode once) under ``folders``, sampled every
    ``interval`` seconds from a thread while the ``with`` block runs: the peak, when it came and
    how it was split between the folders."""

    def __init__(self, folders: list[Path], interval: float = 0.5) -> None:
        self.folders, self.interval = folders, interval
        self.peak, self.peak_seconds = 0, 0.0
        self.peak_parts: dict[str, int] = {}
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DiskSampler:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        seen: set[tuple[int, int]] = set()
        parts: dict[str, int] = {}
        for folder in self.folders:
            parts[folder.name] = 0
            for root, _, files in os.walk(folder):
                for name in files:
                    try:
                        found = os.lstat(os.path.join(root, name))
                    except OSError:  # removed while we looked
                        continue
                    if (found.st_dev, found.st_ino) not in seen:
                        seen.add((found.st_dev, found.st_ino))
                        parts[folder.name] += found.st_blocks * 512
        total = sum(parts.values())
        if total > self.peak:
            self.peak, self.peak_seconds, self.peak_parts = total, time.monotonic() - self._started, parts


def mlp_dynamic_run(folder: Path, layers: int = 36, width: int = 4096) -> dict[str, Any]:
    """The issue's end-to-end case: ``compressor run big.onnx -q dynamic --data x.npz`` (default
    measuring settings) on the MLP of :func:`build_mlp`, scratch files in ``folder/tmp``; its wall
    time, report.json and disk peak (the scratch folder and --out sampled; the input not counted)."""
    model = folder / "mlp" / "big.onnx"
    model.parent.mkdir(parents=True)
    child(__file__, "build-mlp", str(model), str(layers), str(width))
    out, scratch = folder / "out", folder / "tmp"
    scratch.mkdir()
    with DiskSampler([scratch, out]) as disk:
        report, seconds = compressor_run(model, out, scratch, "-q", "dynamic", "--data", str(model.with_name("x.npz")),
                                         min_seconds=None)
    return {"weights": layers * width * width * 4, "wall_seconds": seconds, "report": report,
            "disk_peak_bytes": disk.peak, "disk_peak_seconds": disk.peak_seconds, "disk_peak_parts": disk.peak_parts}


def gb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def multiple(value: float | None, weights: int) -> str:
    return "-" if value is None else f"{value / weights:.2f}x"


def phase(seconds: float | None, peak: float | None, weights: int) -> str:
    return "-" if seconds is None else f"{seconds:.0f} s, {gb(peak)} GB ({multiple(peak, weights)})"


def variant_rows(name: str, report: dict[str, Any], weights: int) -> list[list[str]]:
    variants = report["variants"]
    base = variants[0]["metrics"]
    rows = []
    for variant in variants:
        metrics, meta = variant["metrics"], variant.get("metadata", {})
        if variant.get("error"):
            rows.append([name, variant["name"], "failed: " + variant["error"], *[""] * 6])
            continue
        load = (phase(metrics.get("load_seconds"), metrics.get("load_peak_rss_bytes"), weights)
                if variant is variants[0] else "")
        export = (phase(meta.get("export_seconds"), meta.get("export_peak_rss_bytes"), weights)
                  if variant is variants[0] else "shared")
        cosine = metrics.get("cosine", {}).get("mean") if variant is not variants[0] else 1.0
        fidelity = "-" if cosine is None else f"{cosine:.4f} / {metrics.get('agreement', 1.0):.3f}"
        ratio = base["size_bytes"] / metrics["size_bytes"]
        rows.append([
            name, variant["name"],
            gb(metrics["size_bytes"]) + ("" if variant is variants[0] else f" ({ratio:.2f}x smaller)"),
            load, export if meta.get("export_seconds") is not None else "-",
            phase(metrics.get("compress_seconds"), metrics.get("compress_peak_rss_bytes"), weights),
            phase(metrics.get("measure_seconds"), metrics.get("peak_rss_bytes"), weights),
            fidelity,
        ])
    return rows


def checks(report: dict[str, Any], weights: int) -> list[str]:
    variants = {variant["name"]: variant for variant in report["variants"]}
    found = []
    if any(variant.get("error") for variant in variants.values()):
        found.append("a variant failed: FAIL")
    base, dynamic = variants["original"]["metrics"], variants["dynamic"]["metrics"]
    ratio = base["size_bytes"] / dynamic["size_bytes"]
    found.append(f"dynamic int8 {ratio:.2f}x smaller (floor {FLOORS['size_ratio']}x: "
                 f"{'pass' if ratio >= FLOORS['size_ratio'] else 'FAIL'})")
    peak = dynamic.get("compress_peak_rss_bytes")
    if peak is not None:
        found.append(f"dynamic compress peak RSS {peak / weights:.2f}x W (floor {FLOORS['compress_rss']}x: "
                     f"{'pass' if peak / weights <= FLOORS['compress_rss'] else 'FAIL'})")
    exports = {json.dumps([v.get("metadata", {}).get(key) for key in ("export_seconds", "export_peak_rss_bytes")])
               for v in variants.values()}
    if any(v.get("metadata", {}).get("export_seconds") is not None for v in variants.values()):
        found.append(f"exports: {'one, shared by every variant' if len(exports) == 1 else 'several: FAIL'}")
    return found


def run_mlp(folder: Path, layers: int, width: int) -> tuple[list[list[str]], list[str], str]:
    model = folder / "mlp" / "big.onnx"
    model.parent.mkdir(parents=True)
    child(__file__, "build-mlp", str(model), str(layers), str(width))
    weights = layers * width * width * 4
    data = str(model.with_name("x.npz"))
    report, seconds = compressor_run(model, folder / "out-mlp", folder / "tmp", "-q", "dynamic", "-q", "fp16",
                                     "-q", "int8", "--data", data, "--calibration-data", data)
    direct = json.loads(child(__file__, "direct-ort", str(model), str(folder / "ort" / "big-int8.onnx"),
                              env={"TMPDIR": str(folder / "tmp")}).stdout.strip().splitlines()[-1])
    ours = report["variants"][1]["metrics"]
    comparison = (
        f"ONNX Runtime's `quantize_dynamic(per_channel=True, use_external_data_format=True)` called "
        f"directly on the same file (child process): {direct['seconds']:.0f} s, peak RSS "
        f"{gb(direct['peak_rss_bytes'])} GB ({multiple(direct['peak_rss_bytes'], weights)} W); "
        f"compressor's dynamic step: {ours.get('compress_seconds', 0):.0f} s, "
        f"{gb(ours.get('compress_peak_rss_bytes'))} GB ({multiple(ours.get('compress_peak_rss_bytes'), weights)} W). "
        f"Whole `compressor run` (original and 3 variants, measuring included): {seconds:.0f} s."
    )
    name = f"(a) ONNX MLP, {layers} x MatMul {width}x{width} + Relu, W = {gb(weights)} GB"
    return variant_rows(name, report, weights), [f"(a) {c}" for c in checks(report, weights)], comparison


def run_gpt2(folder: Path) -> tuple[list[list[str]], list[str], str]:
    model = folder / "gpt2"
    child(__file__, "build-gpt2", str(model))
    weights = sum(path.stat().st_size for path in model.glob("*.safetensors"))
    report, seconds = compressor_run(model, folder / "out-gpt2", folder / "tmp", "-q", "dynamic",
                                     "--data", str(folder / "tokens.npz"), "--threads", "2")
    name = (f"(b) GPT-2 shape, {GPT2['n_layer']} layers x {GPT2['n_embd']}, {GPT2['n_head']} heads, "
            f"W = {gb(weights)} GB")
    return (variant_rows(name, report, weights), [f"(b) {c}" for c in checks(report, weights)],
            f"(b) whole `compressor run` (original and 1 variant, measuring included): {seconds:.0f} s.")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, default=Path("/work/bigtmp"))
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--no-gpt2", action="store_true")
    parser.add_argument("--no-mlp", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md")
    parser.add_argument("--threshold", help="COMPRESSOR_LARGE_MODEL_BYTES for smaller trial runs")
    options = parser.parse_args()
    if options.threshold:
        os.environ["COMPRESSOR_LARGE_MODEL_BYTES"] = options.threshold
    folder = options.folder / "bench-big"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        rows, found, notes = [], [], []
        if not options.no_mlp:
            rows, found, note = run_mlp(folder, options.layers, options.width)
            notes = [note]
        for leftover in ("mlp", "out-mlp", "ort", "tmp"):
            shutil.rmtree(folder / leftover, ignore_errors=True)
        if not options.no_gpt2:
            more_rows, more_found, note = run_gpt2(folder)
            rows, found, notes = rows + more_rows, found + more_found, notes + [note]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    table = markdown_table(
        ["model", "variant", "artifact GB", "load: time, peak RSS", "export: time, peak RSS",
         "compress + save: time, peak RSS", "measure: time, peak RSS", "cosine / agreement"],
        rows,
    )
    markdown = f"""## Models past 2 GB (`benchmarks/bench_big.py`)

Each model through `compressor run` in a child process (scratch files in the benchmark's own
folder); W is the bytes of fp32 weights. Peak RSS is the process's kernel high-water mark
(`VmHWM`) for each phase, as a multiple of W: core resets it before loading, before each
variant's compress + save, and each measurement runs in its own process. Export is the torch ->
ONNX export, once per run, inside the original's compress + save ("shared": the variant started
from that export). Fidelity is against the original over {EVAL_ROWS} (a) or 4 (b) inputs: output
cosine and top-1 agreement for (a); for (b), a `GPT2LMHeadModel` folder (random weights; the exported graph ends in `logits`,
and the tied embedding is stored twice), cosine of the logits and next-token top-1 agreement
per position over {SEQUENCE}-token random sequences (random weights give near-uniform
next-token distributions, so top-1 flips more easily than in a trained model), measured with `--threads 2`. `int8` in (a) is static int8 through ONNX Runtime's
`quantize_static(use_external_data_format=True)` on a one-file copy in the scratch folder,
calibrated on the same {EVAL_ROWS} inputs.

{table}

{' '.join(notes)}

Floors: {'; '.join(found)}.

{machine(DISTRIBUTIONS)}
"""
    print(markdown)
    if not options.no_write:
        write_section("big", markdown)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "build-mlp":
        build_mlp(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "build-gpt2":
        build_gpt2(Path(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "direct-ort":
        direct_ort(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
