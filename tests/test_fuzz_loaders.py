"""Property-based fuzzing of every loader through the real CLI.

Small valid models in every format the backends read are mutated at random
(bit flips, truncations, inserted, deleted and overwritten bytes; for zip-based
formats also edits of one member: its bytes, its name, dropping it, adding one)
and given to ``compressor run``. Whatever the damage, the run keeps the four
promises: never exit 1 (an internal error), a failure is one line naming the
model (or the data file, see below), nothing at the output path or in
``$TMPDIR``, and the input's bytes unchanged.

Every run also gets an evaluation data file that fits no model, so a mutant
that still loads stops right after loading with exit 4 naming the data file:
the loaders are what is fuzzed, at a few hundred cases in CI time, while
conversion and measuring of valid models are covered elsewhere. Hypothesis is
derandomized (the same cases on every run) and keeps no example database.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import snapshot
from fasttext_fixtures import FastTextFiles, ft  # noqa: F401 - ft is a fixture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx_fixtures import FACTORY
from tflite_fixtures import dense_model_files

from compressor import Context
from compressor.cli import cli

FORMATS = (".onnx", ".pt", ".pt2", ".keras", ".h5", ".tflite", ".bin", ".ftz")
ZIPPED = (".pt", ".pt2", ".keras")
#: Cases per format: 8 x 100 = 800 runs in CI; COMPRESSOR_FUZZ_CASES=2000 searches deeper.
CASES = int(os.environ.get("COMPRESSOR_FUZZ_CASES", "100"))
#: Most headers and indices sit near the start; half the positions are drawn there.
HEAD = 1024


class Corpus:
    """One small valid model per suffix (as bytes), and evaluation data that fits no model."""

    def __init__(self, models: dict[str, bytes], npz: Path, text: Path) -> None:
        self.models, self.npz, self.text = models, npz, text

    def data_for(self, suffix: str) -> Path:
        return self.text if suffix in (".bin", ".ftz") else self.npz

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing case
        return f"Corpus({', '.join(sorted(self.models))})"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, ft: FastTextFiles) -> Corpus:  # noqa: F811
    import torch

    from compressor_onnx.samples import build_digits_mlp
    from compressor_tflite import plugin as tflite_plugin

    folder = tmp_path_factory.mktemp("corpus")
    torch.manual_seed(0)
    mlp = build_digits_mlp().eval()
    torch.save(mlp.state_dict(), folder / "mlp.pt")
    torch.onnx.export(mlp, (torch.zeros(1, 64),), str(folder / "mlp.onnx"), input_names=["x"],
                      output_names=["logits"], opset_version=17, dynamo=False)
    program = torch.export.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),))
    torch.export.save(program, folder / "linear.pt2")
    keras, h5 = dense_model_files(folder / "keras")
    model = tflite_plugin.compressor_load(keras, "tflite", Context())
    tflite = tflite_plugin.compressor_save(model, folder / "dense", Context()).path
    paths = {".onnx": folder / "mlp.onnx", ".pt": folder / "mlp.pt", ".pt2": folder / "linear.pt2",
             ".keras": keras, ".h5": h5, ".tflite": tflite, ".bin": ft.model, ".ftz": ft.quantized}
    npz, text = folder / "fits-nothing.npz", folder / "fits-nothing.txt"
    np.savez(npz, not_an_input=np.zeros((2, 3), np.float32))
    text.write_text("no label on this line\n")
    return Corpus({suffix: path.read_bytes() for suffix, path in paths.items()}, npz, text)


def mutate_bytes(data: bytes, draw: st.DataObject, what: str) -> tuple[str, bytes]:
    """One random edit of ``data`` and a description of it."""
    kind = draw.draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]),
                     label=f"{what} edit")
    size = len(data)
    limit = max(size - 1, 0)
    position = draw.draw(st.one_of(st.integers(0, min(HEAD, limit)), st.integers(0, limit)),
                         label=f"{what} position")
    changed = bytearray(data)
    if kind == "flip" and size:
        bit = draw.draw(st.integers(0, 7), label="bit")
        changed[position] ^= 1 << bit
        return f"flip bit {bit} of byte {position}", bytes(changed)
    if kind == "truncate" or not size:
        return f"truncate to {position} bytes", data[:position]
    if kind == "insert":
        junk = draw.draw(st.binary(min_size=1, max_size=64), label="inserted")
        return f"insert {len(junk)} bytes at {position}", data[:position] + junk + data[position:]
    if kind == "delete":
        length = draw.draw(st.integers(1, 256), label="deleted")
        return f"delete {length} bytes at {position}", data[:position] + data[position + length :]
    patch = draw.draw(st.binary(min_size=1, max_size=16), label="written")
    changed[position : position + len(patch)] = patch
    return f"overwrite {len(patch)} bytes at {position}", bytes(changed)


def mutate_member(data: bytes, draw: st.DataObject) -> tuple[str, bytes]:
    """A well-formed zip whose content changed: one member edited, renamed, dropped, or one added."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    index = draw.draw(st.integers(0, len(members) - 1), label="member")
    info, content = members[index]
    kind = draw.draw(st.sampled_from(["edit", "rename", "drop", "add"]), label="member edit")
    if kind == "edit":
        change, members[index] = mutate_bytes(content, draw, "member")
        members[index] = (info, members[index])
        description = f"member {info.filename!r}: {change}"
    elif kind == "rename":
        members[index] = (_renamed(info, info.filename + ".renamed"), content)
        description = f"rename member {info.filename!r}"
    elif kind == "drop":
        del members[index]
        description = f"drop member {info.filename!r}"
    else:
        junk = draw.draw(st.binary(max_size=256), label="added")
        members.append((_renamed(info, f"{info.filename.rsplit('/', 1)[0]}/junk"), junk))
        description = f"add {len(junk)} bytes as a member beside {info.filename!r}"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for member, body in members:
            archive.writestr(_renamed(member, member.filename), body)
    return description, buffer.getvalue()


def _renamed(info: zipfile.ZipInfo, name: str) -> zipfile.ZipInfo:
    copy = zipfile.ZipInfo(name, date_time=info.date_time)
    copy.compress_type = info.compress_type
    return copy


def mutate(data: bytes, suffix: str, draw: st.DataObject) -> tuple[str, bytes]:
    if suffix in ZIPPED and draw.draw(st.booleans(), label="zip member edit"):
        return mutate_member(data, draw)
    edits = []
    for _ in range(draw.draw(st.integers(1, 3), label="edits")):
        change, data = mutate_bytes(data, draw, "file")
        edits.append(change)
    return "; ".join(edits), data


def run_mutant(corpus: Corpus, suffix: str, mutated: bytes, folder: Path) -> tuple[int, str, Path]:
    inputs = folder / "inputs"
    inputs.mkdir()
    model = inputs / f"model{suffix}"
    model.write_bytes(mutated)
    data = corpus.data_for(suffix)
    extra = ["--set", f"model_factory={FACTORY}"] if suffix == ".pt" else []
    before = snapshot(inputs)
    out = folder / "out"
    result = CliRunner().invoke(
        cli, ["run", str(model), "-o", str(out), "--data", str(data), "--min-seconds", "0", *extra]
    )
    assert not out.exists(), "the output folder was left behind"
    assert snapshot(inputs) == before, "the input changed"
    return result.exit_code, result.stderr, model


def check_promises(corpus: Corpus, suffix: str, code: int, stderr: str, model: Path,
                   private_tmpdir: Path, description: str) -> None:
    """Assert the four promises for one mutant."""
    lines = stderr.strip().splitlines()
    context = f"{suffix} with {description}: exit {code}: {stderr.strip()[:500]}"
    assert code != 0, context
    assert list(private_tmpdir.iterdir()) == [], f"{context}: left {list(private_tmpdir.iterdir())}"
    assert code != 1, context
    assert len(lines) == 1 and lines[0].startswith("error: "), context
    assert str(model) in lines[0] or str(corpus.data_for(suffix)) in lines[0], context


@pytest.mark.parametrize("suffix", FORMATS)
@settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(draw=st.data())
def test_a_damaged_model_is_a_clean_error(
    corpus: Corpus, private_tmpdir: Path, tmp_path: Path, suffix: str, draw: st.DataObject
) -> None:
    description, mutated = mutate(corpus.models[suffix], suffix, draw)
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        code, stderr, model = run_mutant(corpus, suffix, mutated, folder)
        check_promises(corpus, suffix, code, stderr, model, private_tmpdir, description)
    finally:
        shutil.rmtree(folder)


def _edited(data: bytes, member: str | None, edit: Callable[[bytearray], bytes]) -> bytes:
    """``data`` after ``edit``, applied to the file or to one zip member (rewritten)."""
    if member is None:
        return edit(bytearray(data))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for info, body in members:
            archive.writestr(_renamed(info, info.filename),
                             edit(bytearray(body)) if info.filename.endswith(member) else body)
    return buffer.getvalue()


def _flip(offset: int, bit: int) -> Callable[[bytearray], bytes]:
    def edit(data: bytearray) -> bytes:
        data[offset] ^= 1 << bit
        return bytes(data)

    return edit


#: The smallest cases hypothesis found for bugs it found (a damaged .pt pickle made torch's
#: weights-only unpickler raise IndexError, KeyError, TypeError, AttributeError, struct.error,
#: or warn on stderr): (suffix, member, edit). Kept as regression cases.
KNOWN_CASES: dict[str, tuple[str, str | None, Callable[[bytearray], bytes]]] = {
    "pt-data.pkl-first-opcode-IndexError": (".pt", "data.pkl", _flip(0, 0)),
    "pt-memo-key-KeyError": (".pt", None, _flip(322, 5)),
    "pt-storage-set_-TypeError": (".pt", None, _flip(346, 0)),
    "pt-storage-dtype-AttributeError": (".pt", None, _flip(324, 0)),
    "pt-data.pkl-truncated-struct.error": (".pt", "data.pkl", lambda data: bytes(data[:35])),
    "pt-protocol-byte-UserWarning": (".pt", "data.pkl", _flip(1, 0)),
}


@pytest.mark.parametrize("case", KNOWN_CASES)
def test_cases_the_fuzzer_found_stay_fixed(corpus: Corpus, private_tmpdir: Path, tmp_path: Path, case: str) -> None:
    suffix, member, edit = KNOWN_CASES[case]
    mutated = _edited(corpus.models[suffix], member, edit)
    code, stderr, model = run_mutant(corpus, suffix, mutated, tmp_path)
    check_promises(corpus, suffix, code, stderr, model, private_tmpdir, case)
