"""Fine-tuning on the onnx backend after ``prune`` (unstructured, channel, head) and
``lowrank`` of a torch model, with real torch, onnx and ONNX Runtime: the saved graph
keeps the edit's shapes and zeros, and training on ``--train-data`` wins back what the
one-shot edit lost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_onnx_techniques import compress, tiny_bert

from compressor_onnx.pruning import sparsity_of
from compressor_onnx.samples import digits_split


@pytest.fixture(scope="module")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    split = digits_split()
    path = tmp_path_factory.mktemp("train") / "train.npz"
    np.savez(path, x=split.train_x, y=split.train_y)
    return path


def accuracy(path: Path) -> float:
    import onnxruntime as ort

    split = digits_split()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: split.test_x})[0]
    return float((logits.argmax(1) == split.test_y).mean())


def weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def tuned_and_one_shot(digits: Any, train_data: Path, step: str, folder: Path) -> tuple[Any, Path, Any, Path]:
    options = {"model_factory": "compressor_onnx.samples:build_digits_mlp"}
    for name in ("tuned", "once"):
        (folder / name).mkdir()
    tuned, tuned_path = compress(digits.state_dict, [f"{step} epochs=4"], folder / "tuned", options,
                                 train=train_data)
    once, once_path = compress(digits.state_dict, [f"{step} epochs=0"], folder / "once", options,
                               train=train_data)
    return tuned, tuned_path, once, once_path


def test_channel_pruning_is_fine_tuned_on_the_pruned_structure(digits: Any, train_data: Path,
                                                                tmp_path: Path) -> None:
    tuned, tuned_path, once, once_path = tuned_and_one_shot(
        digits, train_data, "prune 0.75 structure=channel", tmp_path)
    # The same 48 of 64 hidden neurons went in both: the fine-tuned model's masked rows
    # were zeros, so the edit made again on its export removed exactly them.
    assert sorted(w.shape for w in weights(tuned_path).values()) == sorted(w.shape for w in weights(once_path).values())
    assert (64, 16) in {w.shape for w in weights(tuned_path).values()} | {w.shape[::-1] for w in weights(tuned_path).values()}
    one_shot, fine_tuned = accuracy(once_path), accuracy(tuned_path)
    assert one_shot < digits.accuracy - 0.05  # the one-shot edit really hurts this model...
    assert fine_tuned >= digits.accuracy - 0.02  # ...and training on the pruned structure wins it back
    assert tuned.metadata["fine_tuning"]["masked_parameters"] == 2
    losses = tuned.metadata["fine_tuning"]["epoch_losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert any("fine-tuned 4 epoch(s) on 1347 examples of train.npz" in note for note in tuned.notes)
    assert "fine_tuning" not in once.metadata and "one-shot, no fine-tuning (epochs=0)" in once.notes


def test_unstructured_pruning_keeps_its_zeros_through_fine_tuning(digits: Any, train_data: Path,
                                                                   tmp_path: Path) -> None:
    tuned, tuned_path, _, once_path = tuned_and_one_shot(digits, train_data, "prune 0.9", tmp_path)
    assert sparsity_of(onnx.load(str(tuned_path))) == pytest.approx(0.9, abs=0.002)
    assert accuracy(tuned_path) > accuracy(once_path) + 0.1  # measured: 72.9% one-shot, 89.6% tuned


def test_lowrank_is_fine_tuned_as_two_linear_layers(digits: Any, train_data: Path, tmp_path: Path) -> None:
    tuned, tuned_path, _, once_path = tuned_and_one_shot(digits, train_data, "lowrank rank=4", tmp_path)
    # The exporter writes the factors as MatMul or Gemm weights, transposed or not.
    shapes = sorted(tuple(sorted(w.shape)) for w in weights(tuned_path).values() if w.ndim == 2)
    assert shapes == sorted(tuple(sorted(w.shape)) for w in weights(once_path).values() if w.ndim == 2)
    assert shapes == [(4, 64), (4, 64), (10, 64)]
    assert tuned.metadata["fine_tuning"]["factorized_linear_layers"] == ["0"]
    assert accuracy(tuned_path) > accuracy(once_path)


def test_an_onnx_graph_is_not_fine_tuned_and_says_so(digits: Any, train_data: Path, tmp_path: Path) -> None:
    model, path = compress(digits.onnx, ["prune 0.5 structure=channel"], tmp_path, train=train_data)
    assert "fine_tuning" not in model.metadata
    assert any(note.startswith("not fine-tuned: digits.onnx is read as an ONNX graph") for note in model.notes)
    assert accuracy(path) > 0.5


def test_head_pruning_is_fine_tuned_with_labels(tmp_path: Path) -> None:
    folder, data, _ = tiny_bert(tmp_path / "bert", classifier=True)
    (tmp_path / "out").mkdir()
    model, path = compress(folder, ["prune 0.5 structure=head epochs=3 learning_rate=0.001"], tmp_path / "out",
                           calibration=data, train=data)
    facts = model.metadata["fine_tuning"]
    assert facts["loss"] == "KL on softened logits + cross-entropy on labels"
    assert facts["epoch_losses"][-1] < facts["epoch_losses"][0]
    assert onnx.load(str(path)).graph.output[0].name == "logits"


BN_CNN = """
import torch

def build():
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8, 8)), torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(512, 10))
"""


def test_a_batch_norm_the_export_folds_is_folded_for_fine_tuning(train_data: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The exporter folds the BatchNorm into its Conv, so the graph's conv weight is no
    parameter of the module: the BatchNorm is folded in the torch model as well."""
    import torch

    (tmp_path / "bn_cnn.py").write_text(BN_CNN)
    monkeypatch.syspath_prepend(str(tmp_path))
    import bn_cnn

    split = digits_split()
    torch.manual_seed(0)
    module = bn_cnn.build()
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    x, y = torch.from_numpy(split.train_x), torch.from_numpy(split.train_y)
    for _ in range(4):
        for start in range(0, len(x), 64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(module(x[start:start + 64]), y[start:start + 64]).backward()
            optimizer.step()
    torch.save(module.state_dict(), tmp_path / "cnn.pt")
    options = {"model_factory": "bn_cnn:build"}
    for name in ("tuned", "once"):
        (tmp_path / name).mkdir()
    tuned, tuned_path = compress(tmp_path / "cnn.pt", ["prune 0.5 structure=channel epochs=2"], tmp_path / "tuned",
                                 options, train=train_data)
    _, once_path = compress(tmp_path / "cnn.pt", ["prune 0.5 structure=channel epochs=0"], tmp_path / "once",
                            options, train=train_data)
    assert tuned.metadata["fine_tuning"]["batch_norms_folded"] == 1
    assert {w.shape for w in weights(tuned_path).values()} >= {(8, 1, 3, 3), (16, 8, 3, 3)}
    assert accuracy(tuned_path) > accuracy(once_path) + 0.05


TWO_HEADS = """
import torch

class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                         torch.nn.ReLU())
        self.classes = torch.nn.Linear(64, 10)
        self.quadrants = torch.nn.Linear(64, 4)

    def forward(self, x):
        hidden = self.trunk(x)
        return self.classes(hidden), self.quadrants(hidden)

def build():
    return TwoHeads()
"""


def test_fine_tuning_trains_every_output_of_a_two_head_model(train_data: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A detector-like module (class scores and a regression head): fine-tuning after
    pruning matches the second output to the unpruned model's too, not only the first."""
    import onnxruntime as ort
    import torch

    (tmp_path / "two_heads.py").write_text(TWO_HEADS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import two_heads

    split = digits_split()
    x = torch.from_numpy(split.train_x)
    quadrants = x.reshape(-1, 4, 2, 4, 2).mean(dim=(2, 4)).reshape(-1, 16)[:, [0, 3, 12, 15]] * 10
    torch.manual_seed(0)
    module = two_heads.build()
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    for _ in range(15):
        for start in range(0, len(x), 64):
            classes, regressed = module(x[start:start + 64])
            loss = (torch.nn.functional.cross_entropy(classes, torch.from_numpy(split.train_y[start:start + 64]))
                    + torch.nn.functional.mse_loss(regressed, quadrants[start:start + 64]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.save(module.state_dict(), tmp_path / "two.pt")
    with torch.no_grad():
        expected = module.eval()(torch.from_numpy(split.test_x))[1].numpy()

    def second_head_error(epochs: int) -> float:
        folder = tmp_path / f"e{epochs}"
        folder.mkdir()
        _, path = compress(tmp_path / "two.pt", [f"prune 0.75 structure=channel epochs={epochs}"], folder,
                           {"model_factory": "two_heads:build"}, train=train_data)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs = session.run(None, {session.get_inputs()[0].name: split.test_x})
        assert len(outputs) == 2
        return float(((outputs[1] - expected) ** 2).mean() / expected.var())

    one_shot, tuned = second_head_error(0), second_head_error(4)
    assert tuned < one_shot / 3, (one_shot, tuned)


STATEFUL = """
import torch

class Cell(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.mid = torch.nn.Linear(16 + 32, 64), torch.nn.Linear(64, 64)
        self.out, self.state = torch.nn.Linear(64, 8), torch.nn.Linear(64, 32)

    def forward(self, x, h):
        z = torch.relu(self.mid(torch.relu(self.inp(torch.cat([x, h], dim=1)))))
        return self.out(z), torch.tanh(self.state(z))

def build():
    return Cell()
"""


def test_a_stateful_module_is_fine_tuned_on_its_named_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """forward(x, h) -> (y, h'): without declared inputs, one line says how to declare them;
    declared, both inputs are fed by name and both outputs trained."""
    import torch

    from compressor import UsageError

    (tmp_path / "stateful.py").write_text(STATEFUL)
    monkeypatch.syspath_prepend(str(tmp_path))
    import stateful

    torch.manual_seed(0)
    torch.save(stateful.build().state_dict(), tmp_path / "cell.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.standard_normal((256, 16)).astype(np.float32),
             h=rng.standard_normal((256, 32)).astype(np.float32))
    options = {"model_factory": "stateful:build"}
    with pytest.raises(UsageError, match=r"forward\(\) takes 2 inputs \(x, h\): declare them with --set input_shape="):
        compress(tmp_path / "cell.pt", ["prune 0.5 structure=channel"], tmp_path / "a", options)
    model, path = compress(tmp_path / "cell.pt", ["prune 0.5 structure=channel epochs=2"], tmp_path / "b",
                           {**options, "input_shape": "x:1,16;h:1,32"}, train=tmp_path / "train.npz")
    assert model.metadata["fine_tuning"]["examples"] == 256
    assert [i.name for i in onnx.load(str(path)).graph.input] == ["x", "h"]
    assert len(onnx.load(str(path)).graph.output) == 2


def test_a_torch_export_program_is_fine_tuned_and_keeps_its_output_names(digits: Any, train_data: Path,
                                                                        tmp_path: Path) -> None:
    """A .pt2's module cannot switch to training mode; it is trained as exported (eval), and
    the re-exported graph keeps the program's output name, so every output is compared."""
    import torch

    program = torch.export.export(digits.module.eval(), (torch.zeros(2, 64),),
                                  dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, tmp_path / "mlp.pt2")
    names = list(program.graph_signature.user_outputs)
    tuned, tuned_path = compress(tmp_path / "mlp.pt2", ["prune 0.75 structure=channel epochs=4"], tmp_path / "t",
                                 train=train_data)
    _, once_path = compress(tmp_path / "mlp.pt2", ["prune 0.75 structure=channel epochs=0"], tmp_path / "o")
    assert [output.name for output in onnx.load(str(tuned_path)).graph.output] == names
    assert [output.name for output in onnx.load(str(once_path)).graph.output] == names
    assert "fine_tuning" in tuned.metadata
    assert accuracy(tuned_path) > accuracy(once_path) + 0.05
