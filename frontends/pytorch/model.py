"""The one PyTorch model type every backend holds: :class:`TorchModel`.

The onnx backend holds one until its ONNX export (then without the module: what it
says about inputs and outputs stays), the torch backend for good, the tflite backend
until the LiteRT conversion. Steps never change a TorchModel another holder shares:
they make a new one (:meth:`TorchModel.with_module`) or a private copy (:meth:`fork`).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

from compressor_frontends.pytorch.shapes import SampleShape


@dataclass
class TorchModel:
    """A PyTorch model (an eager module, or a ``torch.export`` program), and what it
    takes to feed, export and rebuild it."""

    #: The eager ``nn.Module``; None for a program not yet made eager, or once a
    #: holder let it go (the onnx backend after its export).
    module: Any | None = None
    #: A loaded ``torch.export`` program (``.pt2``): the onnx backend exports it with the
    #: dynamo exporter; :meth:`eager` gives its module.
    exported_program: Any | None = None
    #: The inputs in ``forward``'s order (data files hold an array named after each).
    input_names: tuple[str, ...] = ()
    #: Call the module with keyword inputs (transformers models).
    keyword_inputs: bool = False
    #: Example shapes for export when no data file gives real examples.
    sample_shapes: tuple[SampleShape, ...] = ()
    #: Inputs the model has defaults for (a transformer's token_type_ids): fed and
    #: exported only when the data has them.
    optional_inputs: frozenset[str] = frozenset()
    #: Names of the flattened outputs when known (a program's, a reloaded artifact's);
    #: empty: named after what the module returns (:mod:`compressor_frontends.pytorch.outputs`).
    output_names: tuple[str, ...] = ()
    #: How to build the module again for a state_dict: ``{"factory": "pkg.mod:fn"}``,
    #: ``{"transformers": CLASS, "config": {...}}``, or ``{}`` (none: a program, a changed architecture).
    recipe: dict[str, Any] = field(default_factory=dict)
    #: Quantize modes applied in PyTorch, in order (``dynamic``, ``int8``, ``fp16``).
    quantization: tuple[str, ...] = ()
    #: The dtype the inputs are cast to inside a saved program (``float16`` after fp16).
    dtype: str = "float32"

    def eager(self) -> Any | None:
        """The module to run or train: the module, else the program's (a new one each call)."""
        if self.module is not None:
            return self.module
        return self.exported_program.module() if self.exported_program is not None else None

    def with_module(self, module: Any) -> TorchModel:
        """This model's description holding ``module`` (in eval mode) instead of what it held."""
        return replace(self, module=set_mode(module, False), exported_program=None)

    def without_weights(self) -> TorchModel:
        """This model's description alone: its module and program let go."""
        return replace(self, module=None, exported_program=None)

    def fork(self) -> TorchModel:
        """A private copy: the module deep-copied, the recipe too."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations
            module = copy.deepcopy(self.module)
        return replace(self, module=module, recipe=dict(self.recipe))


def set_mode(module: Any, training: bool) -> Any:
    """``module`` in training or eval mode; a ``torch.export`` program's module cannot switch
    (it keeps the mode it was exported in, eval) and is left as it is."""
    with contextlib.suppress(NotImplementedError):
        module.train(training)
    return module
