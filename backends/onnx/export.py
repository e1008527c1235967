"""The ONNX graph every later step quantizes: a torch model exported once per load.

The PyTorch front end exports (:func:`compressor_frontends.pytorch.export.export_onnx`:
modules through the TorchScript exporter, ``torch.export`` programs through the
dynamo exporter, large ones to a file in the scratch folder). Here the export is
kept in the :class:`ExportCache` that the loaded Network and all its forks share,
and the torch model is dropped afterwards. A transformers causal LM is exported with its
key/value cache (past inputs, present outputs) unless ``--set kv_cache=false``.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from pathlib import Path
from typing import Any

from compressor.plugin import Context, peak_rss_bytes
from compressor_frontends.pytorch import TorchModel
from compressor_onnx.network import ExportCache, Network


def exported(network: Network, context: Context) -> Network:
    """``network`` as an ONNX graph (in memory, or on disk when large); a torch
    model is exported on first use and the export shared with every fork."""
    if not network.is_torch:
        return network
    held = network.torch
    assert held is not None
    cache = network.export or ExportCache(held.module, held.exported_program)
    if cache.graph is None and cache.path is None:
        module = cache.module if cache.module is not None else held.module
        program = cache.exported_program if cache.exported_program is not None else held.exported_program
        source = dataclasses.replace(held, module=module, exported_program=program)
        del module, program
        started = time.perf_counter()
        context.progress("exporting the torch model to ONNX", None)
        cache.graph, cache.path = export_graph(source, context)
        del source
        cache.release()
        cache.exports += 1
        gc.collect()
        cache.metadata = {
            "export_seconds": round(time.perf_counter() - started, 3),
            "export_peak_rss_bytes": peak_rss_bytes(),
        }
    return dataclasses.replace(network, torch=held.without_weights(), graph=cache.graph, path=cache.path,
                               export=cache)


def export_graph(model: TorchModel, context: Context) -> tuple[Any | None, Path | None]:
    """Export the torch model: ``(graph, None)``, or ``(None, path)`` for a large one. A
    transformers causal LM is exported with its key/value cache unless ``--set kv_cache=false``
    (:mod:`compressor_frontends.pytorch.kv_export`)."""
    from compressor_frontends.pytorch.export import export_onnx

    if with_kv_cache(model, context):
        from compressor_frontends.pytorch.kv_export import export_with_cache
        from compressor_onnx.kv_fusion_export import fuse_export

        graph, path = export_with_cache(model, context)
        fuse_export(model, graph, path, context)  # ONNX Runtime's fused attention, where it checks out
        return graph, path
    return export_onnx(model, context)


def with_kv_cache(model: TorchModel, context: Context) -> bool:
    """Whether ``model`` is exported generation-ready: a transformers causal LM whose layers
    keep caches of one shape (else, as after head pruning, it is exported in one pass), kv_cache on."""
    if model.module is None or not model.keyword_inputs or str(context.options.get("kv_cache", True)).lower() in (
            "false", "0", "no"):
        return False
    from compressor_frontends.pytorch.kv_export import has_uniform_cache, is_causal_lm

    return is_causal_lm(model.module) and has_uniform_cache(model.module)
