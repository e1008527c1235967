"""Static int8 of a large ONNX model: peak memory and scratch disk, streamed vs quantize_static.

Builds bench_big.py's MLP (``--layers`` MatMul + Relu layers of ``--width`` squared fp32
weights in one external data file) and quantizes it ``quantize int8`` the two ways the
large path has had, each in a fresh process with its own TMPDIR:

* ``streamed``: ``large.quantize_large`` as the run calls it (int8_static_stream.py:
  calibration in a forked child, weights written one at a time);
* ``quantize_static``: what large.py did before: the model copied into the scratch folder,
  then ONNX Runtime's ``quantize_static`` on it in a forked child (int8_file.py).

Reported per way: the process's own peak RSS (``VmHWM``), the largest child's (``ru_maxrss``
of the waited-for children: for a forked child that is its whole resident peak, the pages
shared with the parent included), the peak of TMPDIR's disk use (a hard link to the input's data counts nothing),
each against W (the weights' bytes). Run: ``/work/venv/bin/python benchmarks/bench_static_stream.py
--layers 16`` (W = 1.07 GB at width 4096).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
WAYS = ("streamed", "quantize_static")


def inodes(folder: Path) -> set[tuple[int, int]]:
    return {(found.st_dev, found.st_ino) for found in (path.lstat() for path in folder.iterdir())}


def disk_use(folder: Path, known: set[tuple[int, int]]) -> int:
    """Bytes of the files under ``folder``, each inode once, none of ``known`` (a hard link to the input)."""
    seen, total = set(known), 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                found = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if (found.st_dev, found.st_ino) not in seen:
                seen.add((found.st_dev, found.st_ino))
                total += found.st_blocks * 512
    return total


def child(way: str, model: Path) -> dict[str, Any]:
    from compressor import Context, Step
    from compressor.builtin import read_npz
    from compressor.memory import peak_rss_bytes
    from compressor_onnx.external import load_skeleton
    from compressor_onnx.shapes import graph_input_specs

    skeleton = load_skeleton(model)
    context = Context(calibration_data=read_npz(model.with_name("x.npz"), tuple(graph_input_specs(skeleton.graph))),
                      workdir=Path(tempfile.mkdtemp(prefix="work-")))
    step = Step("quantize", {"mode": "int8", "per_channel": True, "calibration_method": "minmax",
                             "calibration_samples": 128, "reduce_range": "false"})
    started, baseline = time.perf_counter(), peak_rss_bytes()
    if way == "streamed":
        from compressor_onnx.large import quantize_large

        output, _, metadata = quantize_large(model, step, context)
    else:
        from compressor_frontends.pytorch.export import strip_value_info
        from compressor_onnx.external import write_model
        from compressor_onnx.int8_file import quantize_int8_file

        copy = context.workdir / "quantize-in.onnx"
        write_model(strip_value_info(skeleton), copy, model.parent)
        output = context.workdir / "quantize-out.onnx"
        _, metadata = quantize_int8_file(copy, output, step, [], context, skeleton)
    return {"seconds": round(time.perf_counter() - started, 1), "baseline_rss": baseline, "self_peak": peak_rss_bytes(),
            "child_peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            "calibration_peak": metadata.get("calibration_peak_rss_bytes"),
            "output_bytes": sum(p.stat().st_size for p in output.parent.iterdir() if p.name.startswith(output.name))}


def measure(way: str, model: Path, folder: Path) -> dict[str, Any]:
    tmp = folder / f"tmp-{way}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    peak, stop, known = [0], threading.Event(), inodes(model.parent)

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], disk_use(tmp, known))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = subprocess.run([sys.executable, __file__, "--child", way, "--model", str(model)],
                            env={**os.environ, "TMPDIR": str(tmp)}, capture_output=True, text=True, check=False)
    stop.set()
    sampler.join()
    shutil.rmtree(tmp, ignore_errors=True)
    if result.returncode:
        raise SystemExit(f"{way} failed: {result.stderr[-3000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "tmp_peak": peak[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--folder", type=Path, default=Path("/work/bigtmp/static-stream"))
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--child")
    parser.add_argument("--model", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model)))
        return
    from bench_big import build_mlp

    model = args.folder / f"mlp-{args.layers}x{args.width}" / "big.onnx"
    if not model.exists():
        model.parent.mkdir(parents=True, exist_ok=True)
        build_mlp(model, args.layers, args.width)
    weights = args.layers * args.width * args.width * 4
    for way in args.ways.split(","):
        found = measure(way, model, args.folder)
        ratios = {key: round(found[key] / weights, 2) for key in ("self_peak", "child_peak", "tmp_peak")
                  if found.get(key)}
        print(json.dumps({"way": way, "W": weights, **found, "x_W": ratios}), flush=True)


if __name__ == "__main__":
    main()
