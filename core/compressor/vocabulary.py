"""The shared technique vocabulary and what its techniques take: the ``compressor run``
options, disk-size shares and orders of ``quantize``, ``prune``, ``pq``, ``lowrank`` and
``distill``, and :class:`CliFlag`, the option any technique may declare.

Core reads these only through a backend's :class:`~compressor.specs.Technique`: a
technique named like one of the vocabulary's gets its declaration unless it gives its own
(:func:`shared_declaration`), so ``-q int8`` means the same on every backend, and
``Technique("quantize", modes=("fp16", "int8"))`` is all a backend writes for it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: The shared technique vocabulary. Backends may add others, but these mean the
#: same thing everywhere, so a recipe moves between backends unchanged.
QUANTIZE, PRUNE, PQ = "quantize", "prune", "pq"
#: fp16 weights; dynamic: int8 weights, activations quantized at run time; int8/uint8:
#: full integer, calibrated; int16x8: int16 activations, int8 weights, calibrated;
#: int4: 4-bit weights in blocks, weight-only.
QUANTIZE_MODES = ("fp16", "dynamic", "int8", "uint8", "int16x8", "int4")
#: ``Technique.order`` of a technique that declares none: after the others, before quantization.
DEFAULT_ORDER = 50

_LONG_FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*")
_SHORT_FLAG = re.compile(r"-[A-Za-z]")
#: What a step of a technique leaves of the input's bytes: one share for every step, a share
#: per mode (modes not named keep 1.0), or a function of the step's parameters.
SizeFactor = float | Mapping[str, float] | Callable[[Mapping[str, Any]], float]


@dataclass(frozen=True)
class CliFlag:
    """A ``compressor run`` option that adds a step of its technique to every variant the
    options make: ``--prune 0.5`` adds ``prune 0.5`` (the value fills the technique's
    ``positional`` parameter), a switch such as ``--pq`` adds the step with no parameter,
    and a ``repeat`` option makes one variant per value (``-q fp16 -q int8``). Steps
    run in their techniques' ``order``.

    >>> CliFlag("--prune", metavar="S", help="Prune to sparsity S (0-1) before quantizing.",
    ...         type=float, minimum=0, maximum=1, exclusive=True).takes_value
    True
    """

    #: The long option, ``--prune``.
    name: str
    #: A one-letter alias, ``-q``.
    short: str | None = None
    #: The option's help; ``{modes}`` becomes the modes the installed backends declare.
    help: str = ""
    #: What the value is called in the help (``MODE``, ``S``); None: a switch, no value.
    metavar: str | None = None
    #: Each value makes its own variant (``--quantize``).
    repeat: bool = False
    #: The value's type on the command line: str, int or float.
    type: type = str
    #: Bounds of a number (the command line refuses others before any work).
    minimum: float | None = None
    maximum: float | None = None
    #: The bounds themselves are refused too (``--prune`` takes 0 < S < 1).
    exclusive: bool = False

    def __post_init__(self) -> None:
        if not _LONG_FLAG.fullmatch(self.name):
            raise ValueError(f"CliFlag name {self.name!r} must be a long option such as '--prune'")
        if self.short is not None and not _SHORT_FLAG.fullmatch(self.short):
            raise ValueError(f"CliFlag short {self.short!r} must be one letter such as '-q'")
        if self.type not in (str, int, float):
            raise ValueError(f"CliFlag {self.name}: type must be str, int or float")
        if self.repeat and not self.takes_value:
            raise ValueError(f"CliFlag {self.name}: a switch (no metavar) cannot repeat")

    @property
    def takes_value(self) -> bool:
        return self.metavar is not None

    @property
    def spellings(self) -> tuple[str, ...]:
        return (self.short, self.name) if self.short else (self.name,)


#: ``-q MODE``: one variant per mode.
QUANTIZE_OPTION = CliFlag("--quantize", "-q", help="{modes}; repeat for one variant per mode.", metavar="MODE",
                          repeat=True)
#: ``--prune S``: sets ``prune``'s positional parameter (``sparsity``).
PRUNE_OPTION = CliFlag("--prune", metavar="S", help="Prune to sparsity S (0-1) before quantizing.", type=float,
                       minimum=0, maximum=1, exclusive=True)
#: ``--pq``: product quantization with its defaults.
PQ_OPTION = CliFlag("--pq", help="Product quantization (fastText).")
#: Share of fp32 weights a quantized model keeps, per mode (about bits/32, with scales).
QUANTIZE_SIZE = {"fp16": 0.5, "dynamic": 0.3, "int8": 0.3, "uint8": 0.3, "int4": 0.2}
#: Share a product-quantized fastText model keeps.
PQ_SIZE = 0.5
#: Where each technique's steps go among others: a smaller architecture, then pruning,
#: factorizing, product quantization, quantization (``Technique.order``; others 50).
ORDER = {"distill": 10, PRUNE: 20, "lowrank": 30, PQ: 40, QUANTIZE: 60}


def shared_declaration(technique: str, params: Mapping[str, Any], has_modes: bool) -> dict[str, Any]:
    """What a technique of the shared vocabulary declares unless its backend says otherwise:
    its bare value, option, size share and order (``{}`` for any other technique)."""
    if technique == QUANTIZE:
        return {"cli": QUANTIZE_OPTION if has_modes else None, "size_factor": QUANTIZE_SIZE, "order": ORDER[QUANTIZE]}
    if technique == PRUNE:
        declared = {"order": ORDER[PRUNE]}
        return {**declared, "positional": "sparsity", "cli": PRUNE_OPTION} if "sparsity" in params else declared
    if technique == PQ:
        return {"cli": PQ_OPTION, "size_factor": PQ_SIZE, "order": ORDER[PQ]}
    return {"order": ORDER[technique]} if technique in ORDER else {}
