"""Structural changes to Keras models, rebuilt from their config:
Dense layers as two thin ones (``lowrank``), whole Dense units and Conv2D filters
removed (``prune structure=channel``, in ``channels.py``); optionally fine-tuned.

The model's functional config is edited (layers inserted or narrowed, their
inbound nodes rewired) and the model rebuilt with ``Model.from_config``; every
layer gets its old weights, or the new ones computed here. The model given is
never changed.
"""

from __future__ import annotations

import copy
import fnmatch
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from compressor.plugin import CompressionError, Dataset, ProgressCallback, TensorSpec, UsageError
from compressor_frontends.keras import frameworks


@dataclass
class Restructured:
    model: Any
    note: str
    metadata: dict[str, Any] = field(default_factory=dict)


class LayerGraph:
    """A Keras model's functional config, its layers' weights, and who feeds whom."""

    def __init__(self, model: Any) -> None:
        keras = frameworks.keras()
        if isinstance(model, keras.Sequential) or not hasattr(model, "_nested_inputs"):
            try:
                model = keras.Model(model.inputs, model.outputs, name=model.name)
            except (AttributeError, TypeError, ValueError) as error:
                raise CompressionError(f"cannot restructure this Keras model ({error})") from None
        self.name = model.name
        self.config = copy.deepcopy(model.get_config())
        if "layers" not in self.config or "output_layers" not in self.config:
            raise CompressionError("only functional and Sequential Keras models can be restructured")
        self.weights: dict[str, list[Any]] = {layer.name: layer.get_weights() for layer in model.layers}
        self.entries: dict[str, dict[str, Any]] = {entry["name"]: entry for entry in self.config["layers"]}
        self.consumers: dict[str, list[str]] = defaultdict(list)
        for entry in self.config["layers"]:
            for source in self.inputs(entry["name"]):
                self.consumers[source].append(entry["name"])
        self.outputs = {item[0] for item in self.config["output_layers"]}
        self.taken = set(self.entries)

    def inputs(self, name: str) -> list[str]:
        """The layers feeding ``name`` (its one call); a shared layer lists every call's."""
        nodes = self.entries[name].get("inbound_nodes") or []
        try:
            return [item[0] for node in nodes for item in node]
        except (TypeError, IndexError, KeyError):
            raise CompressionError(f"cannot read the inbound nodes of layer {name!r}") from None

    def is_shared(self, name: str) -> bool:
        return len(self.entries[name].get("inbound_nodes") or []) > 1

    def insert_before(self, name: str, entry: dict[str, Any]) -> None:
        """Put ``entry`` between ``name`` and what fed it."""
        target = self.entries[name]
        entry["inbound_nodes"] = target["inbound_nodes"]
        target["inbound_nodes"] = [[[entry["name"], 0, 0, {}]]]
        layers = self.config["layers"]
        layers.insert(layers.index(target), entry)
        self.entries[entry["name"]] = entry

    def unique(self, base: str) -> str:
        name, suffix = base, 1
        while name in self.taken:
            suffix += 1
            name = f"{base}_{suffix}"
        self.taken.add(name)
        return name

    def rebuild(self) -> Any:
        keras = frameworks.keras()
        for entry in self.config["layers"]:
            entry.pop("build_config", None)  # shapes of the old model
        try:
            model = keras.Model.from_config(self.config)
            for layer in model.layers:
                layer.set_weights(self.weights[layer.name])
        except (ValueError, TypeError, KeyError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CompressionError(f"rebuilding the Keras model failed: {first[:200]}") from None
        return model


def matches(patterns: Sequence[str], name: str) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def patterns_of(params: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(p.strip() for p in str(params.get("layers") or "").split(",") if p.strip())


def rank_for_energy(singular: Any, energy: float) -> int:
    """The smallest rank whose squared singular values reach ``energy`` of their sum."""
    import numpy as np

    squares = np.asarray(singular, dtype=np.float64) ** 2
    cumulative = np.cumsum(squares) / max(float(squares.sum()), 1e-300)
    return int(min(np.searchsorted(cumulative, energy - 1e-12) + 1, len(squares)))


def lowrank(model: Any, params: Mapping[str, Any], inputs: Sequence[TensorSpec], train: Dataset | None,
            seed: int, progress: ProgressCallback) -> Restructured:
    """Replace each matching Dense layer's kernel W (n x m) by A (n x r), a Dense without
    bias or activation, then B (r x m) with the layer's bias, activation and name."""
    import numpy as np

    rank, energy = params.get("rank"), params.get("energy")
    if (rank is None) == (energy is None):
        raise UsageError("lowrank needs exactly one of rank=R (an integer) or energy=E (0.01 to 1)")
    described = f"rank={rank}" if rank is not None else f"energy={float(energy):g}"
    patterns, min_size = patterns_of(params), int(params.get("min_size") or 0)
    graph = LayerGraph(model)
    factorized: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for entry in list(graph.config["layers"]):
        name = entry["name"]
        if entry["class_name"] != "Dense" or not matches(patterns, name):
            continue
        kernel = graph.weights[name][0]
        n, m = kernel.shape
        reason, chosen = None, 0
        if graph.is_shared(name):
            reason = "layer is shared"
        elif n * m < min_size:
            reason = f"{n * m} weights, under min_size={min_size}"
        elif rank is not None and int(rank) >= min(n, m):
            reason = f"rank {rank} is not below the matrix's ({min(n, m)})"
        else:
            u, s, vt = np.linalg.svd(kernel.astype(np.float32), full_matrices=False)
            chosen = int(rank) if rank is not None else rank_for_energy(s, float(energy))
            if chosen * (n + m) >= n * m:
                reason = f"rank {chosen} saves no parameters (r*(n+m) = {chosen * (n + m)} >= n*m = {n * m})"
        if reason is not None:
            skipped.append({"layer": name, "shape": [int(n), int(m)], "reason": reason})
            continue
        root = np.sqrt(s[:chosen])
        first_name = graph.unique(f"{name}_lowrank")
        first_config = {**entry["config"], "name": first_name, "units": chosen, "activation": "linear",
                        "use_bias": False, "kernel_regularizer": None, "kernel_constraint": None,
                        "activity_regularizer": None}
        graph.insert_before(name, {**{k: v for k, v in entry.items() if k != "inbound_nodes"},
                                   "name": first_name, "config": first_config})
        graph.weights[first_name] = [(u[:, :chosen] * root).astype(kernel.dtype)]
        graph.weights[name] = [(root[:, None] * vt[:chosen]).astype(kernel.dtype), *graph.weights[name][1:]]
        factorized.append({"layer": name, "shape": [int(n), int(m)], "rank": chosen})
    if not factorized:
        if not skipped:
            raise CompressionError("lowrank found no Dense layer" + (f" matching layers={','.join(patterns)}"
                                                                    if patterns else ""))
        raise CompressionError(f"lowrank {described} factorized none of {len(skipped)} Dense layer(s): "
                               f"{skipped[0]['layer']}: {skipped[0]['reason']}")
    rebuilt = graph.rebuild()
    before = sum(e["shape"][0] * e["shape"][1] for e in factorized)
    after = sum(e["rank"] * (e["shape"][0] + e["shape"][1]) for e in factorized)
    note = (f"lowrank {described}: {len(factorized)} Dense layer(s) factorized, their kernels "
            f"{before:,} -> {after:,} weights" + (f"; {len(skipped)} left alone" if skipped else ""))
    note += fine_tune(rebuilt, model, params, inputs, train, seed, progress, "fine-tuning the factorized model")
    metadata = {"factorized": factorized, "skipped": skipped, "parameters_before": before,
                "parameters_after": after}
    return Restructured(rebuilt, note, {"lowrank": metadata})


def fine_tune(model: Any, reference: Any, params: Mapping[str, Any], inputs: Sequence[TensorSpec],
              train: Dataset | None, seed: int, progress: ProgressCallback, message: str) -> str:
    """Fine-tune the rebuilt ``model`` when there is training data and epochs; what to add to the note."""
    from compressor_frontends.keras.training import fit

    epochs = int(params.get("epochs") or 0)
    if train is None or epochs == 0:
        return f", no fine-tuning ({'no --train-data' if train is None else 'epochs=0'})"
    frameworks.keras().utils.set_random_seed(seed)
    how = fit(model, reference, params, inputs, train, epochs, progress, message)
    return f", fine-tuned {epochs} epoch(s) on {train.path.name} ({how})"
