"""What a backend gives core to measure a saved artifact: a small runtime.

A backend opens its artifact (``compressor_open_runtime``), says what goes in
and what comes out, and runs one batch of named inputs to named outputs. Core
does everything else alike for every backend (``compressor.engine``): feeding
the data to the inputs, batching, synthetic inputs, warm-up and timing, peak
RSS, what each output means and how it is compared with the original. This is
the one way a backend is measured (``compressor_measure`` is deprecated).

Inputs and outputs are NumPy arrays, the batch on the axis the data says (0 by
default). A text input is declared with dtype ``"str"``: core feeds it an object
array of Python strings (one per example). An output of labels (integers, or
strings such as fastText's ``__label__x``, one per example) is compared as a
classifier's top-1: agreement, confusion, the changed examples, accuracy against
the labels.

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

from compressor.kv_layout import KVCacheLayout, TokenDecoder
from compressor.models import Dataset, TensorSpec


class Runtime:
    """A loaded artifact, ready to run. Subclass it and set ``inputs`` and ``outputs``."""

    #: The inputs the artifact takes, in order; None in a shape is a dynamic axis.
    inputs: tuple[TensorSpec, ...] = ()
    #: The outputs it returns, in order (every one is kept and compared).
    outputs: tuple[TensorSpec, ...] = ()
    #: The one batch size the artifact accepts (exported with a static batch), or None.
    fixed_batch: int | None = None
    #: A causal LM that generates with a key/value cache: how ``run`` takes and returns it
    #: (:class:`compressor.kv_layout.KVCacheLayout`); core then measures generation too.
    kv_cache: KVCacheLayout | None = None

    def token_decoder(self) -> TokenDecoder | None:
        """A runtime that keeps its own cache (no ``kv_cache`` layout) and can generate a token
        at a time returns a :class:`~compressor.kv_layout.TokenDecoder` here; core then
        measures generation through it. Default: None."""
        return None

    def run(self, feeds: Mapping[str, Any]) -> Mapping[str, Any]:
        """Run one batch: ``{input name: array}`` to ``{output name: array}``.

        Raise :class:`compressor.InvalidInputError` when the runtime refuses the
        data (a shape or type it does not take); name the input if you can."""
        raise NotImplementedError

    def metrics(self) -> dict[str, Any]:
        """Facts of this runtime for the report, e.g. ``{"runtime": "LiteRT 1.2"}``."""
        return {}

    def evaluate(self, data: Dataset) -> dict[str, Any]:
        """Optional: your own figures of this artifact on the evaluation data, e.g. fastText's
        ``{"accuracy": precision@1, "precision_at_k": ..., "recall_at_k": ...}`` computed as
        ``fasttext test`` does.

        Called once after core ran every example through :meth:`run`, with the data as your
        ``compressor_load_data`` read it (at most ``settings.max_examples`` examples when the
        reader honours ``limit``). The figures join the variant's metrics; where core's
        comparison with the original has a figure of the same name (``accuracy``), yours stands.
        Core compares the outputs with the original's whatever this returns."""
        return {}

    def close(self) -> None:
        """Release what the runtime holds (optional)."""
