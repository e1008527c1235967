"""How a causal language model's runtime takes and returns its key/value cache.

A runtime that can generate token by token sets :attr:`compressor.runtime.Runtime.kv_cache`
to a :class:`KVCacheLayout`; core then measures it as generation
(:mod:`compressor.generation`): time to first token, decode tokens/s, greedy agreement
with the original, perplexity over the data.

The layout is the one Optimum and ONNX Runtime GenAI use: each past tensor is
``[batch, kv_heads, past_sequence, head_dim]``; ``run`` takes the token inputs and the
past tensors (a prefill gives them with ``past_sequence`` 0) and returns ``logits
[batch, sequence, vocabulary]`` and the present tensors (the past with the new tokens
appended), which the next step feeds back as its past. ``run`` may return these extra
outputs besides the ones ``Runtime.outputs`` declares: core compares only those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KVCacheLayout:
    """The names and shapes of a runtime's cache; what :mod:`compressor.generation` feeds."""

    #: Past inputs, one key and one value per layer, in layer order.
    past_keys: tuple[str, ...]
    past_values: tuple[str, ...]
    #: The present outputs matching them, in the same order.
    present_keys: tuple[str, ...]
    present_values: tuple[str, ...]
    #: Key/value heads (fewer than the attention heads with grouped-query attention) and head size.
    kv_heads: int
    head_dim: int
    logits: str = "logits"
    input_ids: str = "input_ids"
    #: ``[batch, past + sequence]`` of ones for tokens attended to; None if the runtime takes none.
    attention_mask: str | None = "attention_mask"
    #: ``[batch, sequence]`` positions of the new tokens; None if the runtime takes none.
    position_ids: str | None = None
    #: The dtype of the cache tensors (NumPy's name).
    dtype: str = "float32"
    #: Tokens of context the model has positions for (GPT-2's ``n_positions``), None if unbounded
    #: or unknown: prompt, generation and perplexity windows are kept within it.
    max_positions: int | None = None
    #: The bytes of weights one decode step reads (the onnx runtime: every initializer but
    #: embedding tables only a Gather reads; the file's bytes where nothing more precise is
    #: known): decode tokens/s cannot beat memory bandwidth / this. None if unknown.
    weight_bytes: int | None = None

    @property
    def layers(self) -> int:
        return len(self.past_keys)


class TokenDecoder:
    """A runtime that keeps its own key/value cache (llama.cpp does), fed a token at a time;
    :meth:`compressor.runtime.Runtime.token_decoder` returns one, and core measures it as
    generation just as it does a runtime with a :class:`KVCacheLayout`::

        class LlamaDecoder(TokenDecoder):
            def prefill(self, ids):            # a new sequence: logits [len(ids), vocabulary]
                llm.reset(); llm.eval(ids.tolist()); return llm.scores[: len(ids)]
            def decode(self, token):           # one more token: logits [vocabulary]
                llm.eval([token]); return llm.scores[llm.n_tokens - 1]
    """

    #: The bytes of weights one decode step reads (the bound of decode tokens/s); None if unknown.
    weight_bytes: int | None = None
    #: Tokens of context the model has positions for; None if unbounded or unknown.
    max_positions: int | None = None

    def prefill(self, ids: Any) -> Any:
        """Start a new sequence with ``ids`` (1-D int64): the logits of every position."""
        raise NotImplementedError

    def decode(self, token: int) -> Any:
        """Append ``token`` to the sequence: the logits of the next position."""
        raise NotImplementedError
