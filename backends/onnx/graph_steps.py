"""``lowrank`` and ``prune structure=channel`` on an exported network: the graph edits
of ``lowrank.py`` and ``channels.py`` made by :func:`compressor_onnx.rewrite.rewrite_network`."""

from __future__ import annotations

from typing import Any

from compressor.plugin import Context, Step
from compressor_onnx.network import Network
from compressor_onnx.rewrite import rewrite_network


def apply_step(network: Network, step: Step, context: Context) -> tuple[Network, list[str], dict[str, Any], Any]:
    """Run ``lowrank`` or ``prune structure=channel`` on an exported network: the new
    network, the notes and the metadata for the report, and the edit's result."""
    if step.technique == "lowrank":
        from compressor_frontends.pytorch.lowrank import lowrank_request
        from compressor_onnx.lowrank import lowrank_edit

        request = lowrank_request(step.params)
        network, result = rewrite_network(network, lambda model, folder: lowrank_edit(model, folder, request),
                                          context, "lowrank")
        return network, [result.note(request)], {"lowrank": result.to_json()}, result
    from compressor_onnx.channels import channel_edit

    ratio = float(step.params["sparsity"])
    network, result = rewrite_network(network, lambda model, folder: channel_edit(model, folder, ratio),
                                      context, "channels")
    return network, [result.note(ratio)], {"channel_pruning": result.to_json()}, result
