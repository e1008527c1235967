"""Models as they come: several outputs, causal language models, tokenizer inputs,
state_dicts that do not fit, TorchScript under any suffix, checkpoints missing weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from onnx_fixtures import make_tiny_bert

from compressor.cli import cli

HEADS = "test_onnx_real_models:build_detector"


def build_detector() -> Any:
    """A face-detector-shaped module: class scores, 4 box numbers and 10 landmark numbers."""
    import torch

    class Detector(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.body = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU())
            self.classes = torch.nn.Linear(32, 3)
            self.boxes = torch.nn.Linear(32, 4)
            self.landmarks = torch.nn.Linear(32, 10)

        def forward(self, x: Any) -> Any:
            hidden = self.body(x)
            return self.classes(hidden), self.boxes(hidden), {"points": self.landmarks(hidden)}

    return Detector().eval()


def run(*args: object) -> Any:
    return CliRunner().invoke(cli, [str(arg) for arg in args])


@pytest.fixture
def detector(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    import torch

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    folder = tmp_path / "in"
    folder.mkdir()
    weights = folder / "detector.pt"
    torch.save(build_detector().state_dict(), weights)
    data = folder / "eval.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(64, 12)).astype(np.float32))
    return {"weights": weights, "data": data}


def test_every_output_of_a_module_is_exported_and_compared(detector: dict[str, Path], tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "out"
    result = run("run", detector["weights"], "--set", f"model_factory={HEADS}", "-q", "dynamic",
                 "--data", detector["data"], "--min-seconds", "0", "-o", out)
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(out / "original.onnx"), load_external_data=False).graph
    assert [output.name for output in graph.output] == ["output_0", "output_1", "output_2.points"]
    variants = json.loads((out / "report.json").read_text())["variants"]
    outputs = variants[1]["metrics"]["outputs"]
    assert outputs["output_0"]["task"] == "classifier" and "agreement" in outputs["output_0"]
    assert outputs["output_1"]["task"] == outputs["output_2.points"]["task"] == "regression"
    assert outputs["output_1"]["relative_error"]["mean"] < 0.1


def test_a_state_dict_that_does_not_fit_names_its_keys(detector: dict[str, Path], tmp_path: Path) -> None:
    import torch

    state = torch.load(detector["weights"], weights_only=True)
    state["extra.weight"] = state.pop("boxes.weight")
    bad = detector["weights"].with_name("bad.pt")
    torch.save(state, bad)
    result = run("run", bad, "--set", f"model_factory={HEADS}", "-q", "dynamic", "-o", tmp_path / "out")
    assert result.exit_code == 4, result.output
    assert "missing 1 key(s): boxes.weight; unexpected 1 key(s): extra.weight" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("suffix", [".jit", ".ts"])
def test_torchscript_under_any_suffix_is_refused_without_trust(tmp_path: Path, suffix: str) -> None:
    import torch

    path = tmp_path / f"model{suffix}"
    torch.jit.script(torch.nn.Linear(3, 2)).save(str(path))
    result = run("run", path, "-q", "dynamic", "-o", tmp_path / "out")
    assert result.exit_code == 3, result.output
    assert "TorchScript" in result.stderr and "--trust" in result.stderr


def tiny_gpt2(folder: Path) -> dict[str, Path]:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=64)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 300, size=(16, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[8:, 9:] = 0
    data = folder.parent / "tokens.npz"
    np.savez(data, input_ids=ids, attention_mask=mask)
    return {"model": folder, "data": data}


def test_a_causal_language_model_exports_logits_and_is_compared_by_next_token(tmp_path: Path) -> None:
    import onnx

    files = tiny_gpt2(tmp_path / "gpt2")
    out = tmp_path / "out"
    result = run("run", files["model"], "-q", "dynamic", "--data", files["data"], "--min-seconds", "0",
                 "--set", "kv_cache=false", "-o", out)
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(out / "original.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["logits"]
    metrics = json.loads((out / "report.json").read_text())["variants"][1]["metrics"]
    assert metrics["task"] == "language-model" and 0.5 < metrics["agreement"] <= 1.0
    assert metrics["perplexity_original"] > 1 and metrics["perplexity"] > 1


def test_tokenizer_style_data_without_token_type_ids_is_accepted_with_a_note(tmp_path: Path) -> None:
    import onnx

    encoder = make_tiny_bert(tmp_path / "bert")
    with np.load(encoder.eval) as arrays:
        data = tmp_path / "two.npz"
        np.savez(data, input_ids=arrays["input_ids"], attention_mask=arrays["attention_mask"])
    out = tmp_path / "out"
    result = run("run", encoder.folder, "-q", "dynamic", "--data", data, "--min-seconds", "0", "-o", out)
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(out / "original.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    report = json.loads((out / "report.json").read_text())
    assert any("token_type_ids" in note for note in report["variants"][0]["notes"])
    assert report["variants"][1]["metrics"]["task"] == "embedding"


def test_a_checkpoint_missing_weights_is_refused(tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    encoder = make_tiny_bert(tmp_path / "bert")
    weights = next(encoder.folder.glob("*.safetensors"))
    tensors = load_file(str(weights))
    kept = {name: value for name, value in tensors.items() if "layer.1." not in name}
    save_file(kept, str(weights), metadata={"format": "pt"})
    result = run("run", encoder.folder, "-q", "dynamic", "-o", tmp_path / "out")
    assert result.exit_code == 4, result.output
    assert "the checkpoint lacks" in result.stderr and "they would be random" in result.stderr
    assert result.stderr.count("\n") == 1
