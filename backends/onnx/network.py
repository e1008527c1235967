"""What the onnx backend holds as ``Model.handle``: a :class:`Network` (a PyTorch model
still to be exported, an in-memory ONNX graph, or an ONNX file on disk) and the
:class:`ExportCache` a loaded PyTorch model shares with its forks.

Its own module so that every loader (``loading.py``, ``from_keras.py``) and step can
make one without importing the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor_frontends.pytorch import TorchModel


@dataclass
class ExportCache:
    """The torch model of one load and its ONNX export, shared by every fork.

    Exported once, on first use. Then :meth:`release` drops the torch model, here
    and in the loaded Network that still shows it (forks reach it only through
    the cache), so that its memory can go back: the export stands for it.
    """

    module: Any | None = None
    exported_program: Any | None = None
    graph: Any | None = None
    path: Path | None = None
    exports: int = 0
    #: Facts about the export for the report (seconds, peak RSS).
    metadata: dict[str, Any] = field(default_factory=dict)
    holders: list[Network] = field(default_factory=list, repr=False, compare=False)

    def release(self) -> None:
        self.module = self.exported_program = None
        for holder in self.holders:
            if holder.torch is not None:
                holder.torch.module = holder.torch.exported_program = None


@dataclass
class Network:
    """``Model.handle``: a torch model still to be exported, an in-memory ONNX
    graph, or (past the large-model threshold) an ONNX file on disk.

    Steps never modify a Network they are given: they return a new one.
    """

    #: The PyTorch model (a module or a ``torch.export`` program) still to be exported;
    #: once exported it stays without its module, for what it says about the inputs
    #: (torch steps later in a variant, fine-tuning, qat).
    torch: TorchModel | None = None
    graph: Any | None = None
    #: A large model: an ONNX file whose weights sit in external data next to it
    #: (the user's checked file, or one compressor wrote in its scratch folder).
    path: Path | None = None
    #: Shared by a loaded torch model and all its forks (see ExportCache).
    export: ExportCache | None = None
    #: The loaded file's bytes with its external data (ONNX files).
    source_bytes: int | None = None
    #: The graph's input names, where its loader gives them (a converted Keras model).
    input_names: tuple[str, ...] = ()

    @property
    def is_torch(self) -> bool:
        return self.graph is None and self.path is None
