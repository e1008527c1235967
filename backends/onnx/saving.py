"""Write a Network as the ``.onnx`` artifact (plus ``.onnx.data`` for large models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compressor.plugin import Artifact
from compressor_onnx.external import Progress
from compressor_onnx.network import Network


def save_network(network: Network, path: Path, progress: Progress) -> tuple[Artifact, dict[str, Any]]:
    """Save a graph-form network at ``path``: the artifact and the facts to report."""
    import onnx

    from compressor_frontends.pytorch.export import large_model_bytes
    from compressor_onnx.quantization import float_nodes

    side_files: tuple[Path, ...] = ()
    if network.path is not None:
        from compressor_onnx.external import load_skeleton, move_written_model, write_model

        graph = load_skeleton(network.path)
        # A model a step wrote into the scratch folder has its data file moved into staging (on
        # --out's filesystem; published from there by rename): its weights are written once.
        # The network reads its new place from then on (a later step, a fork for the next
        # variant). Otherwise (the user's files, another filesystem, a model saved already)
        # tensor by tensor into one new data file, never a whole proto in memory.
        data_file = move_written_model(graph, network.path, path)
        if data_file is not None:
            network.path = path
        else:
            data_file = write_model(graph, path, network.path.parent, progress=progress)
        side_files = (data_file,) if data_file is not None else ()
    else:
        graph = network.graph
        if graph.ByteSize() > large_model_bytes():
            data_file = path.with_name(f"{path.name}.data")
            onnx.save_model(graph, str(path), save_as_external_data=True, location=data_file.name)
            side_files = (data_file,)
        else:
            onnx.save_model(graph, str(path))
    facts = {
        "opset": next((entry.version for entry in graph.opset_import if entry.domain in ("", "ai.onnx")), None),
        "float_nodes": float_nodes(graph),
    }
    return Artifact("onnx", path, "onnx", side_files), facts
