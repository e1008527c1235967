"""``.pt2`` archives that would unpickle code are refused without ``--trust``.

Each case plants a payload that writes a marker file when unpickled, in every
place ``torch.export.load`` unpickles or loads code from, and checks the four
promises plus that the payload never ran.
"""

from __future__ import annotations

import contextlib
import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from test_faults import UNSAFE, check_refused

INVALID = 4


class Payload:
    """Unpickling this runs ``open(marker, "w")``: the code a hostile file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def pickled(marker: Path) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid archive with weights, a buffer and a tensor constant."""
    import torch

    class Module(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)
            self.offset = torch.ones(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) + self.offset

    path = tmp_path_factory.mktemp("pt2") / "valid.pt2"
    torch.export.save(torch.export.export(Module(), (torch.zeros(1, 4),)), path)
    return path


def rewrite(source: Path, target: Path, edit: Callable[[str, bytes], bytes | None],
            extra: dict[str, bytes] | None = None) -> Path:
    """A copy of the archive with members changed by ``edit`` (None drops one)."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        root = original.namelist()[0].split("/", 1)[0]
        for info in original.infolist():
            data = edit(info.filename.split("/", 1)[1], original.read(info))
            if data is not None:
                copy.writestr(info, data)
        for name, data in (extra or {}).items():
            copy.writestr(f"{root}/{name}", data)
    return target


def flag_first_weight(marker: Path) -> Callable[[str, bytes], bytes | None]:
    def edit(name: str, data: bytes) -> bytes:
        if name == "data/weights/model_weights_config.json":
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return json.dumps(config).encode()
        if name == "data/weights/weight_0":
            return pickled(marker)
        return data

    return edit


def opaque_constant(marker: Path) -> Callable[[str, bytes], bytes | None]:
    def edit(name: str, data: bytes) -> bytes:
        if name == "data/constants/model_constants_config.json":
            config = json.loads(data)
            entry = next(iter(config["config"].values()))
            entry["path_name"] = "opaque_obj_0"
            return json.dumps(config).encode()
        return data

    return edit


def sample_inputs(marker: Path) -> Callable[[str, bytes], bytes | None]:
    def edit(name: str, data: bytes) -> bytes:
        return pickled(marker) if name == "data/sample_inputs/model.pt" else data

    return edit


CASES = {
    "pickled weight": (flag_first_weight, {}, "pickled weight"),
    "opaque constant": (opaque_constant, {}, "pickled object"),
    "sample inputs": (sample_inputs, {}, "pickle that needs code"),
    "compiled library": (lambda marker: (lambda name, data: data),
                         {"data/aotinductor/model/model.so": b"\x7fELF"}, "compiled code"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_code_in_a_pt2_is_refused_without_trust(program: Path, tmp_path: Path, case: str) -> None:
    make_edit, extra, message = CASES[case]
    marker = tmp_path / "PAYLOAD-RAN"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    hostile = rewrite(program, inputs / "hostile.pt2", make_edit(marker), extra)
    check_refused(hostile, UNSAFE, message, tmp_path, "-q", "dynamic", "--set", "input_shape=1,4")
    assert not marker.exists()


def test_the_payload_really_runs_when_loaded_naively(program: Path, tmp_path: Path) -> None:
    """The crafted archive is a real exploit: torch.export.load runs it."""
    import torch

    marker = tmp_path / "PAYLOAD-RAN"
    hostile = rewrite(program, tmp_path / "hostile.pt2", flag_first_weight(marker))
    with contextlib.suppress(Exception):  # only whether the payload ran matters here
        torch.export.load(str(hostile))
    assert marker.exists()


def test_a_damaged_payload_config_is_invalid_input(program: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()

    def edit(name: str, data: bytes) -> bytes:
        return b"{not json" if name.endswith("_weights_config.json") else data

    damaged = rewrite(program, inputs / "damaged.pt2", edit)
    check_refused(damaged, INVALID, "damaged .pt2 archive", tmp_path, "-q", "dynamic")


def test_a_clean_pt2_still_compresses(program: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from compressor.cli import cli

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["run", str(program), "-q", "dynamic", "--min-seconds", "0",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "dynamic.onnx").is_file()
