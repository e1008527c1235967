"""What a backend gives core to measure a saved artifact: a small runtime.

A backend opens its artifact (``compressor_open_runtime``), says what goes in
and what comes out, and runs one batch of named inputs to named outputs. Core
does everything else alike for every backend (``compressor.engine``): feeding
the data to the inputs, batching, synthetic inputs, warm-up and timing, peak
RSS, what each output means and how it is compared with the original.

Example, a NumPy backend::

    class NpzRuntime(Runtime):
        def __init__(self, path):
            self.weights = dict(numpy.load(path))
            self.inputs = (TensorSpec("x", (None, 64), "float32"),)
            self.outputs = (TensorSpec("logits", (None, 10), "float32"),)

        def run(self, feeds):
            return {"logits": feeds["x"] @ self.weights["w"]}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from compressor.models import TensorSpec


class Runtime:
    """A loaded artifact, ready to run. Subclass it and set ``inputs`` and ``outputs``."""

    #: The inputs the artifact takes, in order; None in a shape is a dynamic axis.
    inputs: tuple[TensorSpec, ...] = ()
    #: The outputs it returns, in order (every one is kept and compared).
    outputs: tuple[TensorSpec, ...] = ()
    #: The one batch size the artifact accepts (exported with a static batch), or None.
    fixed_batch: int | None = None

    def run(self, feeds: Mapping[str, Any]) -> Mapping[str, Any]:
        """Run one batch: ``{input name: array}`` to ``{output name: array}``.

        Raise :class:`compressor.InvalidInputError` when the runtime refuses the
        data (a shape or type it does not take); name the input if you can."""
        raise NotImplementedError

    def metrics(self) -> dict[str, Any]:
        """Facts of this runtime for the report, e.g. ``{"runtime": "LiteRT 1.2"}``."""
        return {}

    def close(self) -> None:
        """Release what the runtime holds (optional)."""
