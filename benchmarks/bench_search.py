"""``compressor search`` against the full grid of the same space.

For each model: the search (objective and budget as below, ``--max-trials`` at
most half the grid) and ``compressor run`` of every configuration of the same
space, in the same run; the table gives trials, wall time and the winner's
objective against the grid's best within the budget. Floor: the search's winner
within 10% of the grid's best, measuring at most half the grid's variants.

* fastText on the Debian descriptions (a dim-16 bigram model of tens of MB):
  objective size, at most 0.5 pt precision@1 lost; the space is the backend's
  (dsub x qnorm x cutoff with retraining).
* ``--models digits,cnn``: the digits MLP (onnx) and CNN (tflite), objective latency,
  at most 1 pt lost; the backends' declared spaces.

Usage: python benchmarks/bench_search.py [--models fasttext,digits,cnn] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SHARED, compressor_cli, machine, markdown_table, train_classifier, write_section  # noqa: E402

DATA = SHARED / "data" / "debian-descriptions"
WORK = Path(os.environ.get("SEARCH_BENCH_DIR", Path(tempfile.gettempdir()) / "compressor-bench-search"))


def fasttext_case() -> dict[str, Any]:
    import fasttext

    WORK.mkdir(parents=True, exist_ok=True)
    model = WORK / "debian-dim16.bin"
    if not model.exists():
        trained = fasttext.train_supervised(str(DATA / "train.txt"), wordNgrams=2, dim=16, epoch=10,
                                            bucket=1_000_000, thread=os.cpu_count() or 1, seed=0, verbose=0)
        trained.save_model(str(model))
    return {"name": "fastText, Debian descriptions", "model": model, "objective": "size",
            "budget": ["--max-accuracy-drop", "0.5"],
            "args": ["--data", str(DATA / "test.txt"), "--train-data", str(DATA / "train.txt")]}


def digits_case() -> dict[str, Any]:
    """The 64-512-512-10 MLP of bench_techniques, trained on the digits and exported to
    ONNX: wide enough that channel pruning and int8 change its latency measurably."""
    import numpy as np
    import torch
    from bench_techniques import wide_mlp

    from compressor_onnx.samples import digits_split

    WORK.mkdir(parents=True, exist_ok=True)
    split = digits_split()
    model, evaluation, calibration = WORK / "digits-mlp.onnx", WORK / "digits-eval.npz", WORK / "digits-calib.npz"
    if not model.exists():
        torch.manual_seed(0)
        x = torch.from_numpy(split.train_x)
        module = train_classifier(wide_mlp(), x, torch.from_numpy(split.train_y))
        torch.onnx.export(module, (x[:1],), str(model), input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    np.savez(evaluation, x=split.test_x, y=split.test_y)
    np.savez(calibration, x=split.train_x[:256])
    return {"name": "digits MLP 64-512-512-10 (onnx)", "model": model, "objective": "latency",
            "budget": ["--max-accuracy-drop", "1"],
            "args": ["--data", str(evaluation), "--calibration-data", str(calibration)]}


def cnn_case() -> dict[str, Any]:
    """bench_tflite's digits CNN (151k parameters), trained; channel pruning and lowrank
    fine-tune on the training split (--train-data), int8 calibrates on part of it."""
    import numpy as np
    from bench_tflite import trained_digits_cnn

    WORK.mkdir(parents=True, exist_ok=True)
    model_path = WORK / "digits-cnn.keras"
    model, train_x, train_y, test_x, test_y = trained_digits_cnn()
    model.save(model_path)
    paths = {name: WORK / f"cnn-{name}.npz" for name in ("train", "eval", "calib")}
    np.savez(paths["train"], image=train_x, y=train_y)
    np.savez(paths["eval"], image=test_x, y=test_y)
    np.savez(paths["calib"], image=train_x[:200])
    return {"name": "digits CNN, 151k parameters (tflite)", "model": model_path, "objective": "latency",
            "budget": ["--max-accuracy-drop", "1"],
            "args": ["--data", str(paths["eval"]), "--train-data", str(paths["train"]),
                     "--calibration-data", str(paths["calib"])]}


def grid_recipe(case: dict[str, Any], path: Path) -> int:
    """Every configuration of the backend's space as a recipe; returns their number."""
    from compressor import search_space
    from compressor.plugins import get_host

    host = get_host()
    backend = host.backend(host.identify(case["model"]) or "")
    stages = search_space.from_backend(backend)
    lines, count = [], 0
    for config in search_space.configurations(stages):
        variant = search_space.variant(config, stages)
        if variant is None:
            continue
        steps = ", ".join(json.dumps(str(step)) for step in variant.steps)
        lines.append(f'[variants."{variant.name}"]\nsteps = [{steps}]\n')
        count += 1
    path.write_text("".join(lines))
    return count


def run_case(case: dict[str, Any]) -> list[Any]:
    out = WORK / case["model"].stem
    shutil.rmtree(out, ignore_errors=True)
    recipe = out / "grid.toml"
    out.mkdir(parents=True)
    grid_size = grid_recipe(case, recipe)
    started = time.perf_counter()
    search = compressor_cli("search", str(case["model"]), "--objective", case["objective"], *case["budget"],
                            "--max-trials", str(grid_size // 2), "--min-seconds", "0.2", "-o", str(out / "search"),
                            *case["args"])
    search_seconds = time.perf_counter() - started
    del search
    summary = json.loads((out / "search" / "report.json").read_text())
    found = summary["settings"]["search"]
    winner = next(v for v in summary["variants"] if v["name"] == found["winner"])
    started = time.perf_counter()
    result = compressor_cli("run", str(case["model"]), "--recipe", str(recipe), *case["budget"],
                            "--min-seconds", "0.2", "-o", str(out / "grid"), *case["args"], check=False)
    grid_seconds = time.perf_counter() - started
    grid = json.loads((out / "grid" / "report.json").read_text())
    key = {"size": lambda v: v["metrics"].get("size_bytes"),
           "latency": lambda v: (v["metrics"].get("latency_ms") or {}).get("p50")}[case["objective"]]
    feasible = [v for v in grid["variants"][1:] if not v["budget_failures"] and not v["error"] and key(v)]
    best = min(feasible, key=key)
    ratio = key(winner) / key(best)
    verdict = "pass" if ratio <= 1.10 and found["measured"] <= grid_size / 2 else "FAIL"
    del result
    return [case["name"], case["objective"], grid_size, f"{found['tried']} ({found['measured']} measured)",
            f"{search_seconds:.0f} s", f"{grid_seconds:.0f} s", f"{winner['name']} ({key(winner):,.4g})",
            f"{best['name']} ({key(best):,.4g})", f"{ratio:.2f}x", verdict]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="fasttext")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    cases = []
    if "fasttext" in args.models:
        cases.append(fasttext_case())
    if "digits" in args.models:
        cases.append(digits_case())
    if "cnn" in args.models:
        cases.append(cnn_case())
    rows = [run_case(case) for case in cases]
    table = markdown_table(["model", "objective", "grid", "search trials", "search time", "grid time",
                            "search winner", "grid best", "winner / best", "floor"], rows)
    text = (f"## Search against the full grid\n\n{machine(('fasttext-numpy2', 'onnxruntime', 'optuna'))}\n\n"
            "`python benchmarks/bench_search.py`: `compressor search --max-trials (grid / 2)` and "
            "`compressor run` of every configuration of the same space. Floor: the winner within "
            "10% of the grid's best within budget, measuring at most half the grid.\n\n" + table)
    print(text)
    if not args.no_write:
        write_section("search", text)


if __name__ == "__main__":
    main()
