"""``prune structure=head`` and ``distill`` on the onnx backend, on the torch model before
export, with real transformers, torch, onnx and ONNX Runtime: the saved ONNX really
has the smaller matrices, the heads removed are the ones that matter least, the
student has the requested size, steps chain with quantization, and bad requests
are refused with one line before any work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx_fixtures import compress_with

from compressor import Model
from compressor.cli import cli
from compressor_onnx import plugin

FAST = ["--min-seconds", "0"]
MLP = "compressor_onnx.samples:build_digits_mlp"
HIDDEN, HEADS, SIZE = 32, 4, 8
#: Heads whose value weights are zero: their output is exactly zero, whatever the input.
DEAD = {0: (1, 3), 1: (0, 2)}
STUDENT = """
import torch

def small():
    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))

def wrong():
    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
"""


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(arg) for arg in args])
    return result.exit_code, result.output


def variants(out: Path) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in json.loads((out / "report.json").read_text())["variants"]}


def matrices(path: Path) -> list[list[int]]:
    """The shapes of the 2-D float or int8 weights of a saved ONNX model, sorted."""
    return sorted(list(t.dims) for t in onnx.load(str(path)).graph.initializer
                  if len(t.dims) == 2 and "embeddings" not in t.name and "pooler" not in t.name)


def recipe(folder: Path, **steps: list[str]) -> Path:
    path = folder / "recipe.toml"
    path.write_text("".join(f"[variants.{name}]\nsteps = {json.dumps(value)}\n" for name, value in steps.items()))
    return path


def compress(path: Path, steps: list[str], folder: Path, options: dict[str, Any] | None = None,
             **data: Path) -> tuple[Model, Path]:
    """Load ``path`` like the CLI does, apply ``steps``, save: the model and the saved file."""
    model, artifact = compress_with(plugin, "onnx", path, steps, folder, options, **data)
    return model, artifact.path


def tiny_bert(folder: Path, classifier: bool = False) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A two-layer, four-head BERT (an encoder, or a 3-class classifier) saved as a transformers
    folder, with two dead heads per layer, and token data (with labels for the classifier)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=120, hidden_size=HIDDEN, num_hidden_layers=2,
                                     num_attention_heads=HEADS, intermediate_size=64,
                                     max_position_embeddings=64, num_labels=3)
    cls = transformers.BertForSequenceClassification if classifier else transformers.BertModel
    model = cls(config).eval()
    encoder = model.bert if classifier else model
    with torch.no_grad():
        for index, heads in DEAD.items():
            value = encoder.encoder.layer[index].attention.self.value
            for head in heads:
                value.weight[head * SIZE:(head + 1) * SIZE] = 0
                value.bias[head * SIZE:(head + 1) * SIZE] = 0
    model.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(0)
    rows, length = 16, 12
    input_ids = rng.integers(5, 120, size=(rows, length)).astype(np.int64)
    mask = (np.arange(length)[None, :] < rng.integers(4, length + 1, size=rows)[:, None]).astype(np.int64)
    arrays = {"input_ids": np.where(mask == 1, input_ids, 0), "attention_mask": mask}
    data = folder.parent / f"{folder.name}.npz"
    extra = {"y": rng.integers(0, 3, size=rows)} if classifier else {}
    np.savez(data, **arrays, **extra)
    return folder, data, arrays


def torch_outputs(folder: Path, arrays: dict[str, np.ndarray]) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in arrays.items()}).last_hidden_state.numpy()


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]


def test_head_pruning_removes_the_dead_heads_and_chains_with_quantization(tmp_path: Path) -> None:
    folder, data, arrays = tiny_bert(tmp_path / "bert")
    steps = recipe(tmp_path, quantized=["prune 0.5 structure=head", "quantize dynamic"])
    code, output = invoke("run", folder, "--recipe", steps, "--data", data, "-o", tmp_path / "out", *FAST)
    assert code == 0, output
    report = variants(tmp_path / "out")
    variant = report["quantized"]
    facts = variant["metadata"]["head_pruning"]
    assert facts["method"].startswith("ablation")
    assert [layer["removed"] for layer in facts["layers"]] == [list(DEAD[0]), list(DEAD[1])]
    assert (facts["heads_before"], facts["heads_after"]) == (8, 4)
    assert "4 of 8 attention heads removed" in variant["notes"][0]
    # Q, K, V lose half their outputs and the attention output half its inputs; the FFN stays.
    assert matrices(tmp_path / "out" / variant["artifact"]) == sorted(
        [[HIDDEN, HIDDEN // 2]] * 6 + [[HIDDEN // 2, HIDDEN]] * 2 + [[HIDDEN, 64], [64, HIDDEN]] * 2)
    assert matrices(tmp_path / "out" / report["original"]["artifact"]) == sorted(
        [[HIDDEN, HIDDEN]] * 8 + [[HIDDEN, 64], [64, HIDDEN]] * 2)
    # The dead heads added nothing: only int8 rounding separates it from the original.
    assert variant["metrics"]["cosine"]["mean"] > 0.99
    graph = onnx.load(str(tmp_path / "out" / variant["artifact"]))
    assert "DynamicQuantizeLinear" in {node.op_type for node in graph.graph.node}


def test_head_pruning_of_an_encoder_keeps_its_outputs(tmp_path: Path) -> None:
    folder, data, arrays = tiny_bert(tmp_path / "bert")
    model, saved = compress(folder, ["prune 0.25 structure=head"], tmp_path, eval=data)
    assert model.metadata["head_pruning"]["heads_after"] == 6
    np.testing.assert_allclose(run_onnx(saved, arrays), torch_outputs(folder, arrays), atol=1e-4)


def test_head_pruning_of_a_classifier_ranks_by_gradient(tmp_path: Path) -> None:
    import torch
    import transformers

    folder, data, arrays = tiny_bert(tmp_path / "cls", classifier=True)
    model, saved = compress(folder, ["prune 0.5 structure=head"], tmp_path, calibration=data)
    facts = model.metadata["head_pruning"]
    assert facts["method"].startswith("Michel et al. gradient") and "labels" in facts["method"]
    assert [layer["removed"] for layer in facts["layers"]] == [list(DEAD[0]), list(DEAD[1])]
    assert all(layer["scores"][head] == 0 for layer, index in zip(facts["layers"], DEAD) for head in DEAD[index])
    original = transformers.AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager")
    with torch.no_grad():
        logits = original.eval()(**{k: torch.from_numpy(v) for k, v in arrays.items()}).logits.numpy()
    np.testing.assert_allclose(run_onnx(saved, arrays), logits, atol=1e-4)


def test_head_pruning_of_distilbert_layout(tmp_path: Path) -> None:
    """DistilBERT's q_lin/k_lin/v_lin/out_lin attention: the dead heads go, the outputs stay."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=120, dim=HIDDEN, n_layers=2, n_heads=HEADS, hidden_dim=64,
                                           max_position_embeddings=64)
    model = transformers.DistilBertModel(config).eval()
    with torch.no_grad():
        for index, heads in DEAD.items():
            value = model.transformer.layer[index].attention.v_lin
            for head in heads:
                value.weight[head * SIZE:(head + 1) * SIZE] = 0
                value.bias[head * SIZE:(head + 1) * SIZE] = 0
    folder = tmp_path / "distilbert"
    model.save_pretrained(folder, safe_serialization=True)
    rng = np.random.default_rng(0)
    mask = (np.arange(12)[None, :] < rng.integers(4, 13, size=16)[:, None]).astype(np.int64)
    arrays = {"input_ids": np.where(mask == 1, rng.integers(5, 120, size=(16, 12)), 0).astype(np.int64),
              "attention_mask": mask}
    np.savez(tmp_path / "tokens.npz", **arrays)
    pruned, saved = compress(folder, ["prune 0.5 structure=head"], tmp_path, eval=tmp_path / "tokens.npz")
    facts = pruned.metadata["head_pruning"]
    assert [layer["removed"] for layer in facts["layers"]] == [list(DEAD[0]), list(DEAD[1])]
    assert matrices(saved).count([HIDDEN, HIDDEN // 2]) == 6 and matrices(saved).count([HIDDEN // 2, HIDDEN]) == 2
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in arrays.items()}).last_hidden_state.numpy()
    np.testing.assert_allclose(run_onnx(saved, arrays), expected, atol=1e-4)


def write_mlp(folder: Path) -> tuple[Path, Path, Path]:
    """A 64-64-10 MLP state_dict (compressor_onnx.samples' factory), labelled and
    unlabelled training data, and the students' factory module on the path."""
    import torch

    from compressor_onnx.samples import build_digits_mlp

    torch.manual_seed(0)
    weights = folder / "mlp.pt"
    torch.save(build_digits_mlp().state_dict(), weights)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(96, 64)).astype(np.float32)
    np.savez(folder / "train.npz", x=x, y=rng.integers(0, 10, size=96))
    np.savez(folder / "unlabelled.npz", x=x)
    (folder / "students_h17.py").write_text(STUDENT)
    return weights, folder / "train.npz", folder / "unlabelled.npz"


def test_distill_into_a_factory_student_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights, train, unlabelled = write_mlp(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    steps = recipe(tmp_path, student=["distill student=students_h17:small epochs=2 batch_size=16"],
                   quantized=["distill student=students_h17:small epochs=2", "quantize dynamic"])
    code, output = invoke("run", weights, "--recipe", steps, "--train-data", train, "--data", unlabelled,
                          "--set", f"model_factory={MLP}", "-o", tmp_path / "out", *FAST)
    assert code == 0, output
    report = variants(tmp_path / "out")
    facts = report["student"]["metadata"]["distillation"]
    assert (facts["teacher_parameters"], facts["student_parameters"]) == (64 * 64 + 64 + 650, 64 * 16 + 16 + 170)
    assert "cross-entropy on labels" in facts["loss"]
    assert len(facts["epoch_losses"]) == 2 and facts["epoch_losses"][1] < facts["epoch_losses"][0]
    for name in ("student", "quantized"):
        # The Gemm's (10, 16) and (16, 64) weights, transposed by the quantizer into MatMuls.
        assert sorted(sorted(dims) for dims in matrices(tmp_path / "out" / report[name]["artifact"])) == [
            [10, 16], [16, 64]]
    assert "distilled into student=students_h17:small" in report["student"]["notes"][0]


def test_distill_without_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights, _, unlabelled = write_mlp(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    model, saved = compress(weights, ["distill student=students_h17:small epochs=3 temperature=1"], tmp_path,
                            {"model_factory": MLP}, train=unlabelled)
    facts = model.metadata["distillation"]
    assert facts["loss"] == "KL on softened logits, no labels"
    assert facts["epoch_losses"][-1] < facts["epoch_losses"][0]
    assert matrices(saved) == [[10, 16], [16, 64]]


def test_distill_layers_of_a_transformers_teacher(tmp_path: Path) -> None:
    folder, data, arrays = tiny_bert(tmp_path / "bert")
    model, saved = compress(folder, ["distill layers=1 epochs=1", "quantize dynamic"], tmp_path, train=data)
    facts = model.metadata["distillation"]
    assert facts["teacher_layers_copied"] == [1]
    assert facts["loss"] == "MSE + cosine on hidden states on last_hidden_state; MSE over the variance on pooler_output"
    # One layer: Q, K, V, attention output and the feed-forward pair.
    assert matrices(saved) == sorted([[HIDDEN, HIDDEN]] * 4 + [[HIDDEN, 64], [64, HIDDEN]])
    assert run_onnx(saved, arrays).shape == (16, 12, HIDDEN)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    from compressor_onnx.samples import build_digits_mlp

    folder = tmp_path_factory.mktemp("requests")
    weights, train, _ = write_mlp(folder)
    bert, bert_data, _ = tiny_bert(folder / "bert")
    onnx_path = folder / "mlp.onnx"
    torch.onnx.export(build_digits_mlp(), (torch.zeros(1, 64),), str(onnx_path), input_names=["x"], dynamo=False)
    np.savez(folder / "labels.npz", x=np.zeros((4, 64), np.float32), y=np.array([0, 3, 12, 1]))
    return {"folder": folder, "mlp": weights, "mlp-labels": weights, "train": train, "bert": bert,
            "bert-data": bert_data, "onnx": onnx_path, "labels": folder / "labels.npz"}


@pytest.mark.parametrize("kind,steps,extra,message", [
    ("onnx", ["prune 0.5 structure=head"], ["--data"], "needs the PyTorch or transformers model; mlp.onnx is read as an ONNX graph"),
    ("mlp", ["prune 0.5 structure=head"], ["--data"], "needs a transformers model (attention heads)"),
    ("bert", ["prune 0.5 structure=head"], [], "ranks heads on data: pass --data or --calibration-data"),
    ("bert", ["quantize dynamic", "prune 0.5 structure=head"], ["--data"], "put it before quantize"),
    ("bert", ["distill layers=1"], [], "'distill layers=1' needs --train-data on backend 'onnx'"),
    ("bert", ["distill layers=2"], ["--train-data"], "the teacher has 2 layers; layers= must be fewer"),
    ("bert", ["distill layers=1 student=a.b:c"], ["--train-data"], "exactly one of student="),
    ("mlp", ["distill layers=1"], ["--train-data"], "layers= needs a transformers teacher"),
    ("mlp", ["distill student=students_h17:wrong"], ["--train-data"], "the student's output has shape [N, 3], the teacher's output [N, 10]"),
    ("mlp", ["distill student=no_such_module:f"], ["--train-data"], "cannot import distill student"),
    ("mlp-labels", ["distill student=students_h17:small"], ["--train-data"], "has label 12, the model 10 classes"),
])
def test_bad_requests_exit_2_with_one_line(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, kind: str,
                                           steps: list[str], extra: list[str], message: str) -> None:
    monkeypatch.syspath_prepend(str(files["folder"]))
    options = ["--set", f"model_factory={MLP}"] if kind.startswith("mlp") else []
    data = files["bert-data"] if kind == "bert" else files["labels"] if kind == "mlp-labels" else files["train"]
    args = [arg for flag in extra for arg in (flag, data)]
    out = files["folder"] / "out"
    code, output = invoke("run", files[kind], "--recipe", recipe(files["folder"], v=steps), *args, *options,
                          "-o", out, *FAST)
    assert code == 2, output
    assert message in output and len(output.strip().splitlines()) == 1, output
    assert not out.exists()
