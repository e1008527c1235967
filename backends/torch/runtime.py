"""A saved torch artifact opened for core to measure: PyTorch on the CPU, threads
fixed to the requested count, under ``torch.inference_mode``.

A ``.pt2`` loads through the PyTorch front end's safe loader (weights-only, pickled
entries refused); a safetensors artifact is rebuilt from its manifest. Every
output the model returns is given back, named as at save time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from compressor.plugin import (
    Artifact,
    InvalidInputError,
    MeasureSettings,
    Runtime,
    TensorSpec,
    first_line,
)


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(threads)))
    # Settable once per process, before any parallel work; already set then.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


def open_net(artifact: Artifact) -> tuple[Any, tuple[TensorSpec, ...]]:
    """The artifact's TorchModel and input specs."""
    from compressor_frontends.pytorch import TorchModel
    from compressor_torch.loading import manifest_path, read_extra

    path = artifact.path
    if path.suffix == ".pt2":
        facts = read_extra(path)
        if facts is None:
            raise InvalidInputError("this .pt2 was not saved by the torch backend (no extra/compressor.json)", path)
        if any(mode in ("dynamic", "int8") for mode in facts.get("quantization", ())):
            from compressor_torch.quantize import import_torchao

            import_torchao()  # registers the torchao ops the program calls

        from compressor_frontends.pytorch.pt2 import load_program

        program = load_program(path, trust=False)
        net = TorchModel(program.module(), input_names=tuple(facts["inputs"]),
                         output_names=tuple(facts["outputs"]), quantization=tuple(facts.get("quantization", ())))
        specs = tuple(TensorSpec(s["name"], tuple(s["shape"]), s["dtype"]) for s in facts["specs"])
        return net, specs
    from compressor_torch.loading import rebuild_from_manifest
    from compressor_torch.saving import wrap

    net, specs = rebuild_from_manifest(path, manifest_path(path))
    net.module = wrap(net)
    return net, specs


class TorchRuntime(Runtime):
    def __init__(self, artifact: Artifact, settings: MeasureSettings) -> None:
        set_threads(settings.threads)
        net, specs = open_net(artifact)
        self.module = net.module
        self.inputs = specs
        self._outputs = net.output_names
        self.outputs = tuple(TensorSpec(name, (), "float32") for name in net.output_names)
        firsts = {spec.shape[0] for spec in specs if spec.shape}
        self.fixed_batch = int(next(iter(firsts))) if len(firsts) == 1 and None not in firsts else None

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        tensors = []
        for spec in self.inputs:
            if spec.name not in feeds:
                if spec.optional:
                    continue
                raise InvalidInputError(f"no data for input {spec.name!r}")
            tensors.append(torch.from_numpy(feeds[spec.name]))
        try:
            with torch.inference_mode():
                result = self.module(*tensors)
        except Exception as error:  # noqa: BLE001 - a program's guards and kernels raise many types
            raise InvalidInputError(f"PyTorch refused the inputs: {first_line(error)}") from error
        values = result if isinstance(result, tuple | list) else (result,)
        return {name: value.numpy() for name, value in zip(self._outputs, values)}

    def metrics(self) -> dict[str, Any]:
        import torch

        return {"runtime": f"torch {torch.__version__}", "torch_threads": torch.get_num_threads()}
