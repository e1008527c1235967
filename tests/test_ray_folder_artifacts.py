"""A folder artifact (onnxruntime-genai's model folder, a SavedModel) travels between Ray
workers and the driver whole, and its size is every file inside it."""

from __future__ import annotations

from pathlib import Path

import pytest

from compressor.builtin import size_metrics
from compressor.errors import CompressorError
from compressor.models import Artifact
from compressor.ray_executor import Made, artifact_bytes, stage
from compressor.results import VariantResult


def test_a_folder_artifact_is_sent_and_staged_whole(tmp_path: Path) -> None:
    folder = tmp_path / "made" / "genai-int4"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"graph")
    (folder / "sub" / "tokenizer.json").write_bytes(b"{}" * 10)
    (folder / "link").symlink_to(folder / "model.onnx")  # never followed
    side = tmp_path / "made" / "extra.json"
    side.write_text("{}")
    artifact = Artifact("onnx", folder, "genai", (side,))
    files = artifact_bytes(artifact)
    assert files == {"genai-int4/model.onnx": b"graph", "genai-int4/sub/tokenizer.json": b"{}" * 10,
                     "extra.json": b"{}"}
    staged = stage(Made(VariantResult("genai-int4", []), files, "onnx", "genai", "genai-int4"),
                   tmp_path / "driver" / "artifact")
    assert staged.path == tmp_path / "driver" / "genai-int4" and staged.side_files == (tmp_path / "driver" / "extra.json",)
    assert (staged.path / "sub" / "tokenizer.json").read_bytes() == b"{}" * 10
    assert size_metrics(staged)["size_bytes"] == len(b"graph") + 20 + 2
    assert size_metrics(artifact)["size_bytes"] == len(b"graph") + 20 + 2  # the link is not counted twice


def test_a_worker_cannot_write_outside_the_staging_folder(tmp_path: Path) -> None:
    made = Made(VariantResult("x", []), {"../escape.onnx": b"x"}, "onnx", "onnx", "escape.onnx")
    with pytest.raises(CompressorError, match="outside the artifact"):
        stage(made, tmp_path / "driver" / "artifact")
    assert not (tmp_path / "escape.onnx").exists()
