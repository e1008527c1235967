"""A runtime whose model reads one token sequence at a time (llama.cpp, onnxruntime-genai).

Such runtimes keep their own cache and take no batch: :class:`SequenceRuntime` gives them
core's ``run`` contract. Each row's tokens where ``attention_mask`` is 1 go to
:meth:`SequenceRuntime.sequence_logits` (left or right padding alike), and their logits come
back at those positions, zeros elsewhere. Ids outside the vocabulary are refused first,
in one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from compressor.errors import InvalidInputError
from compressor.models import TensorSpec
from compressor.runtime import Runtime

#: The shortest context (cache) a sequence runtime opens: longer sequences reopen it at the
#: next power of two (:meth:`SequenceRuntime.context_for`).
MIN_CONTEXT = 256
#: Room a generation's prefill leaves in the context for the tokens decoded after it.
DECODE_ROOM = 256
#: What a sequence runtime takes: token ids, and optionally which of them are real.
TOKEN_INPUTS = (TensorSpec("input_ids", (None, None), "int64"),
                TensorSpec("attention_mask", (None, None), "int64", optional=True))


class SequenceRuntime(Runtime):
    """``run`` over rows for a model fed one sequence at a time. A subclass sets
    ``vocabulary`` and implements :meth:`sequence_logits`; :meth:`prepare` may make room for
    the longest row first (a context reopened longer).

    Example::

        class MyRuntime(SequenceRuntime):
            def __init__(self, artifact, settings):
                self.engine = open_engine(artifact.path)
                self.vocabulary = self.engine.vocabulary
                self.outputs = (TensorSpec("logits", (None, None, self.vocabulary), "float32"),)

            def sequence_logits(self, ids):
                return self.engine.logits(ids)  # [len(ids), vocabulary]
    """

    inputs = TOKEN_INPUTS
    vocabulary: int = 0

    def sequence_logits(self, ids: Any) -> Any:
        """The logits of every position of ``ids`` (1-D int64), ``[len(ids), vocabulary]``."""
        raise NotImplementedError

    @staticmethod
    def context_for(tokens: int, limit: int | None = None) -> int:
        """The context to open for ``tokens``: a power of two, at least :data:`MIN_CONTEXT`, at
        most ``limit`` (the model's own, where it has one)."""
        wanted = max(MIN_CONTEXT, 1 << (max(tokens, 1) - 1).bit_length())
        return min(wanted, limit) if limit else wanted

    def prepare(self, longest: int) -> None:
        """Called once per ``run`` with the longest row's token count, before any row."""

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        import numpy as np

        ids = np.asarray(feeds["input_ids"])
        if ids.ndim != 2:
            raise InvalidInputError(f"input_ids must be [batch, tokens], not {list(ids.shape)}")
        mask = feeds.get("attention_mask")
        keep = np.ones(ids.shape, dtype=bool) if mask is None else np.asarray(mask).astype(bool)
        if keep.shape != ids.shape:
            raise InvalidInputError(f"attention_mask {list(keep.shape)} does not match input_ids {list(ids.shape)}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocabulary):
            raise InvalidInputError(f"input_ids hold ids from {int(ids.min())} to {int(ids.max())}; the model's "
                                    f"vocabulary has {self.vocabulary}")
        self.prepare(int(keep.sum(axis=1).max()) if ids.size else 0)
        logits = np.zeros((*ids.shape, self.vocabulary), dtype=np.float32)
        for row in range(ids.shape[0]):
            positions = np.flatnonzero(keep[row])
            if len(positions):
                logits[row, positions] = self.sequence_logits(ids[row, positions].astype(np.int64))
        return {"logits": logits}
