"""``prune structure=channel`` on Keras models: whole Dense units and Conv2D filters removed.

A chain is a Dense or Conv2D layer, then layers that keep each channel apart
(activations, dropout, BatchNormalization, pooling and padding; after a Conv2D
also Flatten or global pooling), then the Dense or Conv2D layer that reads the
result. The share ``sparsity`` of the first layer's outputs with the lowest L2
norm of incoming weights is removed, with their BatchNormalization entries and
the next layer's matching inputs (every position's, after a Flatten), so the
rebuilt model is really smaller. Chains are found in the model's order, so a
layer narrowed as the next layer of one chain is scored on its kept inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from compressor.plugin import CompressionError, Dataset, ProgressCallback, TensorSpec
from compressor_frontends.keras.structure import LayerGraph, Restructured, fine_tune

#: Layers that act on each channel alone and keep the channel axis last.
PASS_THROUGH = frozenset({
    "Activation", "ReLU", "LeakyReLU", "ELU", "ThresholdedReLU", "Dropout", "SpatialDropout1D",
    "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "AlphaDropout", "BatchNormalization",
})
#: Channel-wise layers of image tensors.
SPATIAL = frozenset({"MaxPooling2D", "AveragePooling2D", "ZeroPadding2D", "Cropping2D", "UpSampling2D"})
#: Image tensor to rows: Flatten spreads each channel over the positions; global pooling does not.
TO_ROWS = frozenset({"Flatten", "GlobalAveragePooling2D", "GlobalMaxPooling2D"})
LAYERS = ("Dense", "Conv2D")


def prune_channels(model: Any, params: Mapping[str, Any], inputs: Sequence[TensorSpec], train: Dataset | None,
                   seed: int, progress: ProgressCallback) -> Restructured:
    import numpy as np

    ratio = float(params["sparsity"])
    graph = LayerGraph(model)
    pruned: list[dict[str, Any]] = []
    not_pruned: list[dict[str, Any]] = []
    for entry in list(graph.config["layers"]):
        name = entry["name"]
        if entry["class_name"] not in LAYERS:
            continue
        chain = _chain(graph, name)
        if isinstance(chain, str):
            not_pruned.append({"layer": name, "reason": chain})
            continue
        region, next_layer = chain
        kernel = graph.weights[name][0]
        width = kernel.shape[-1]
        removed = int(round(ratio * width))
        rows = graph.weights[next_layer][0].shape[-2]
        flattened = any(graph.entries[layer]["class_name"] == "Flatten" for layer in region)
        reason = None
        if removed == 0 or removed >= width:
            reason = f"{width} outputs: ratio removes {'none' if removed == 0 else 'all'}"
        elif rows % width or (rows != width and not flattened):
            reason = f"the next layer {next_layer} takes {rows} inputs, not {width}"
        if reason is not None:
            not_pruned.append({"layer": name, "reason": reason})
            continue
        norms = np.sqrt((kernel.reshape(-1, width).astype(np.float64) ** 2).sum(axis=0))
        kept = np.sort(np.argsort(-norms, kind="stable")[: width - removed])
        graph.weights[name] = [np.take(w, kept, axis=-1) for w in graph.weights[name]]
        entry["config"]["units" if entry["class_name"] == "Dense" else "filters"] = int(len(kept))
        for layer in region:
            if graph.entries[layer]["class_name"] == "BatchNormalization":
                graph.weights[layer] = [np.take(w, kept, axis=0) for w in graph.weights[layer]]
        next_weights = graph.weights[next_layer]
        spread = rows // width
        index = (np.arange(spread)[:, None] * width + kept[None, :]).reshape(-1)
        next_weights[0] = np.take(next_weights[0], index, axis=-2)
        pruned.append({"layer": name, "next": next_layer, "channels": int(width), "kept": int(len(kept))})
    if not pruned:
        reasons = "; ".join(f"{e['layer']}: {e['reason']}" for e in not_pruned[:3]) or "no Dense or Conv2D layer"
        raise CompressionError(f"no layer can be channel-pruned ({reasons})")
    before = model.count_params()
    rebuilt = graph.rebuild()
    note = (f"channel pruning {ratio:g}: {len(pruned)} layer(s) narrowed by L2 norm "
            f"({sum(e['channels'] for e in pruned)} -> {sum(e['kept'] for e in pruned)} outputs), "
            f"parameters {before:,} -> {rebuilt.count_params():,}")
    if not_pruned:
        note += "; not pruned: " + "; ".join(f"{e['layer']} ({e['reason']})" for e in not_pruned[:3])
    note += fine_tune(rebuilt, model, params, inputs, train, seed, progress, "fine-tuning the narrowed model")
    metadata = {"pruned": pruned, "not_pruned": not_pruned, "parameters_before": before,
                "parameters_after": rebuilt.count_params()}
    return Restructured(rebuilt, note, {"channel_pruning": metadata})


def _chain(graph: LayerGraph, name: str) -> tuple[list[str], str] | str:
    """The layers between ``name`` and the next Dense/Conv2D, and that layer; or why there are none."""
    problem = _problem(graph, name)
    if problem:
        return problem
    spatial = graph.entries[name]["class_name"] == "Conv2D"
    region: list[str] = []
    current = name
    while True:
        if current in graph.outputs:
            return "its output is a model output" if current == name else f"{current} is a model output"
        users = graph.consumers.get(current, [])
        if len(users) != 1:
            return f"{current} feeds {len(users)} layers" if users else f"{current} is not used"
        user = graph.entries[users[0]]
        kind, user_config = user["class_name"], user["config"]
        if graph.is_shared(users[0]):
            return f"{users[0]} is a shared layer"
        if kind in LAYERS:
            if kind == "Conv2D" and not spatial:
                return f"the next layer {users[0]} is a Conv2D after a flattened tensor"
            problem = _problem(graph, users[0])
            return (region, users[0]) if not problem else f"the next layer {users[0]}: {problem}"
        if kind == "BatchNormalization" and _axis(user_config.get("axis")) not in (-1, 3 if spatial else 1):
            return f"{users[0]} normalizes another axis"
        if kind in TO_ROWS and spatial and user_config.get("data_format", "channels_last") == "channels_last":
            spatial = False
        elif kind not in PASS_THROUGH and not (spatial and kind in SPATIAL):
            return f"{current} feeds {kind} {users[0]}"
        region.append(users[0])
        current = users[0]


def _axis(value: Any) -> Any:
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def _problem(graph: LayerGraph, name: str) -> str | None:
    entry = graph.entries[name]
    config = entry["config"]
    if graph.is_shared(name):
        return "shared layer"
    if entry["class_name"] == "Conv2D":
        if int(config.get("groups", 1)) != 1:
            return "grouped convolution"
        if config.get("data_format", "channels_last") != "channels_last":
            return "channels_first"
    if len(graph.weights.get(name, [])) == 0:
        return "no weights"
    return None
