"""A ``torch.export`` program (``.pt2``) quantized on the torch backend: its linear calls become
nn.Linear layers again for torchao, and the saved program holds int8 weights only."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compressor import Context, Dataset, MeasureSettings, Step

ROWS, FEATURES, HIDDEN, CLASSES = 32, 256, 512, 4


def _module() -> Any:
    """Two Linear layers whose weights only they read, and one whose weight a second call reads
    too (a tied weight, as a language model's head shares its embedding)."""
    import torch

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = torch.nn.Linear(FEATURES, HIDDEN)
            self.back = torch.nn.Linear(HIDDEN, FEATURES, bias=False)
            self.head = torch.nn.Linear(HIDDEN, CLASSES)

        def forward(self, x: Any) -> tuple[Any, Any]:
            hidden = torch.relu(self.first(x))
            tied = torch.nn.functional.linear(hidden, self.head.weight)
            return self.head(hidden), self.back(hidden) + tied.sum(-1, keepdim=True)

    return Tied().eval()


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import torch

    folder = tmp_path_factory.mktemp("pt2")
    torch.manual_seed(0)
    module = _module()
    x = np.random.default_rng(0).normal(size=(ROWS, FEATURES)).astype("float32")
    exported = torch.export.export(module, (torch.from_numpy(x[:2]),),
                                   dynamic_shapes=({0: torch.export.Dim.AUTO},))
    path = folder / "tied.pt2"
    torch.export.save(exported, str(path))
    with torch.no_grad():
        expected = [tensor.numpy() for tensor in module(torch.from_numpy(x))]
    np.savez(folder / "eval.npz", x=x, y=expected[0].argmax(1))
    return {"path": path, "x": x, "expected": expected, "eval": folder / "eval.npz"}


def _hook(name: str) -> Any:
    from compressor.plugins import get_host

    return get_host().hook_for("torch", name)


def _float_matrices(artifact: Path) -> list[list[int]]:
    """Shapes of the float32 weight matrices a saved program stores (its ``weights`` config)."""
    with zipfile.ZipFile(artifact) as archive:
        config = next(name for name in archive.namelist() if name.endswith("weights/model_weights_config.json"))
        entries = json.loads(archive.read(config))["config"]
    shapes = [[size["as_int"] for size in entry["tensor_meta"]["sizes"]] for entry in entries.values()
              if entry["tensor_meta"]["dtype"] == 7]  # 7: float32 in torch.export's schema
    return sorted(shape for shape in shapes if len(shape) == 2 and min(shape) > 1)


@pytest.mark.parametrize("mode", ["dynamic", "int8"])
def test_a_pt2_program_is_quantized_and_saved_with_int8_weights(
        program: dict[str, Any], tmp_path: Path, mode: str) -> None:
    context = Context()
    original = _hook("compressor_load")(path=program["path"], backend="torch", context=context)
    fork = _hook("compressor_fork")(model=original, context=context)
    quantized = _hook("compressor_compress")(model=fork, step=Step("quantize", {"mode": mode}), context=context)
    assert quantized.metadata["quantized_layers"] == 2
    assert any("2 linear call(s) made nn.Linear layers" in note and "2 left float" in note
               for note in quantized.notes), quantized.notes
    context.eval_data = Dataset(path=program["eval"], features={"x": program["x"]}, labels=None, size=ROWS)
    saved = {name: _hook("compressor_save")(model=model, destination=tmp_path / name, context=context)
             for name, model in (("original", original), (mode, quantized))}
    # Only the tied weight stays float; the original holds all three float weights.
    assert _float_matrices(saved[mode].path) == [[CLASSES, HIDDEN]]
    assert _float_matrices(saved["original"].path) == sorted([[HIDDEN, FEATURES], [FEATURES, HIDDEN],
                                                              [CLASSES, HIDDEN]])
    assert saved[mode].path.stat().st_size < 0.5 * saved["original"].path.stat().st_size
    runtime = _hook("compressor_open_runtime")(artifact=saved[mode], settings=MeasureSettings())
    got = list(dict(runtime.run({"x": program["x"]})).values())
    for value, want in zip(got, program["expected"]):
        cosine = float((value * want).sum() / np.linalg.norm(value) / np.linalg.norm(want))
        assert cosine > 0.999, cosine
    assert (got[0].argmax(1) == program["expected"][0].argmax(1)).mean() >= 0.9
    # The loaded program itself is untouched: a later fork quantizes from float again.
    assert not [name for name, _ in original.handle.module.named_modules() if "compressor_linear" in name]


def test_fp16_of_a_pt2_program_is_refused_before_any_work(program: dict[str, Any], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from compressor.cli import cli

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(program["path"]), "--backend", "torch", "-q", "dynamic", "-q",
                                      "fp16", "--data", str(program["eval"]), "-o", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "quantize dynamic or int8 it" in lines[0], lines
    assert not out.exists()
