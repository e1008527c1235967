"""A torch MLP trained on scikit-learn digits through the compressor CLI:
accuracy drop of dynamic and static int8 (floor: <= 0.5 pt), plus fp16 and pruning.

Run: ``/work/venv/bin/python benchmarks/bench_onnx_digits.py``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import compressor_cli, machine, markdown_table, write_section  # noqa: E402

MAX_DROP_PT = 0.5
RECIPE = """
[variants.dynamic]
steps = ["quantize dynamic"]

[variants.int8]
steps = ["quantize int8"]

[variants.uint8]
steps = ["quantize uint8"]

[variants.fp16]
steps = ["quantize fp16"]

[variants.prune-dynamic]
steps = ["prune 0.5", "quantize dynamic"]
"""


def main() -> None:
    import numpy as np
    import torch

    from compressor_onnx.samples import FACTORY, digits_split, train_digits_mlp

    split = digits_split()
    with tempfile.TemporaryDirectory(prefix="bench-onnx-digits-") as scratch:
        work = Path(scratch)
        torch.save(train_digits_mlp(split).state_dict(), work / "digits.pt")
        np.savez(work / "eval.npz", x=split.test_x, y=split.test_y)
        np.savez(work / "calibration.npz", x=split.train_x[:256])
        (work / "recipe.toml").write_text(RECIPE)
        compressor_cli(
            "run", str(work / "digits.pt"), "-o", str(work / "out"), "--recipe", str(work / "recipe.toml"),
            "--set", f"model_factory={FACTORY}", "--data", str(work / "eval.npz"),
            "--calibration-data", str(work / "calibration.npz"), "--threads", "1", "--repeats", "3",
        )
        report = json.loads((work / "out" / "report.json").read_text())
    variants = {variant["name"]: variant["metrics"] for variant in report["variants"]}
    base = variants["original"]
    rows = [
        [
            name,
            f"{metrics['size_bytes'] / 1e3:.1f}",
            f"{metrics['accuracy'] * 100:.2f}",
            f"{(base['accuracy'] - metrics['accuracy']) * 100:+.2f}",
            f"{metrics.get('agreement', 1.0):.4f}",
            f"{metrics['latency_ms']['p50'] * 1000:.0f}",
            f"{metrics['latency_batch_ms']['p50'] * 1000:.0f}",
        ]
        for name, metrics in variants.items()
    ]
    table = markdown_table(
        ["variant", "KB", "accuracy %", "drop pt", "agreement", "p50 us (b1)", "p50 us (b32)"], rows
    )
    drops = {name: (base["accuracy"] - variants[name]["accuracy"]) * 100 for name in ("dynamic", "int8")}
    checks = ", ".join(
        f"{name} {drop:+.2f} pt ({'pass' if drop <= MAX_DROP_PT else 'FAIL'})" for name, drop in drops.items()
    )
    markdown = f"""## onnx: MLP on scikit-learn digits

`benchmarks/bench_onnx_digits.py`: a 64-64-10 torch MLP trained on 75% of scikit-learn's
digits, saved as a state_dict and loaded with `--set model_factory=...`; evaluated on the other
{len(split.test_y)} images through `compressor run` (1 thread, 3 repeats, medians); static
variants calibrated on 256 training images.

{table}

Floor (accuracy drop <= {MAX_DROP_PT} pt for dynamic and static int8): {checks}.

{machine(("torch", "onnx", "onnxruntime"))}
"""
    print(markdown)
    write_section("onnx-digits", markdown)


if __name__ == "__main__":
    main()
