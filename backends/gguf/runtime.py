"""A GGUF file run by llama.cpp (llama-cpp-python's ``Llama``): token ids in, logits out.

Inputs ``input_ids`` (int64 ``[N, T]``) and, optionally, ``attention_mask``; output
``logits`` ``[N, T, vocab]``, which core compares as a language model (next-token top-1
agreement and perplexity), as it does the onnx backend's Hugging Face causal LMs. Every
row is its own sequence: the key-value cache is cleared before each, and only the
positions the mask keeps are evaluated (in order, at positions 0, 1, ...); the others get
zero logits, which core's comparison leaves out through the same mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compressor.plugin import (
    DECODE_ROOM,
    MIN_CONTEXT,
    Artifact,
    InvalidInputError,
    MeasureSettings,
    SequenceRuntime,
    TensorSpec,
    TokenDecoder,
    first_line,
    native_output_silenced,
)


class LlamaCppRuntime(SequenceRuntime):
    """A saved GGUF file opened by llama.cpp on the CPU."""

    def __init__(self, artifact: Artifact, settings: MeasureSettings) -> None:
        self.path, self.threads = artifact.path, settings.threads
        self.context = 0
        self.llm: Any = None
        self.open(int(settings.options.get("n_ctx") or MIN_CONTEXT))
        self.vocabulary = int(self.llm.n_vocab())
        metadata = self.llm.metadata
        self.trained_context = int(metadata.get(f"{metadata.get('general.architecture')}.context_length") or 0)
        self.outputs = (TensorSpec("logits", (None, None, self.vocabulary), "float32"),)

    def open(self, context: int) -> None:
        import llama_cpp

        if self.llm is not None:
            self.llm.close()
            self.llm = None
        try:
            with native_output_silenced():  # llama.cpp reports its context settings natively
                self.llm = llama_cpp.Llama(str(self.path), n_ctx=context, n_batch=context, n_ubatch=context,
                                           n_threads=self.threads, n_threads_batch=self.threads,
                                           logits_all=True, verbose=False)
        except ValueError as error:  # llama-cpp-python's "Failed to load model from file"
            raise InvalidInputError(f"llama.cpp cannot open it ({first_line(error)})", self.path) from None
        self.context = context

    def prepare(self, longest: int) -> None:
        self.fit(longest)

    def sequence_logits(self, ids: Any) -> Any:
        self.llm.reset()  # the next eval starts at position 0 and clears the cache past it
        self.llm.eval(ids.tolist())
        return self.llm.scores[: len(ids)]

    def fit(self, tokens: int) -> None:
        """Reopen the context, if it holds fewer than ``tokens`` (within the model's own)."""
        if tokens <= self.context:
            return
        if self.trained_context and tokens > self.trained_context:
            raise InvalidInputError(f"a row has {tokens} tokens, more than the model's context of "
                                    f"{self.trained_context}")
        self.open(self.context_for(tokens, self.trained_context or None))

    def token_decoder(self) -> TokenDecoder:
        """Generation through llama.cpp's own cache: core measures time to first token, decode
        tokens/s against the bandwidth bound, greedy agreement and perplexity with it."""
        return LlamaDecoder(self)

    def metrics(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {"runtime": f"llama.cpp (llama-cpp-python {version('llama-cpp-python')}) CPU",
                "n_ctx": self.context}

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


class LlamaDecoder(TokenDecoder):
    """A runtime's llama.cpp context fed a token at a time (its cache kept by llama.cpp)."""

    def __init__(self, runtime: LlamaCppRuntime) -> None:
        self.runtime = runtime
        self.weight_bytes = streamed_weight_bytes(runtime.path)
        self.max_positions = runtime.trained_context or None

    def prefill(self, ids: Any) -> Any:
        import numpy as np

        tokens = [int(token) for token in ids]
        room = min(len(tokens) + DECODE_ROOM, self.max_positions or len(tokens) + DECODE_ROOM)
        self.runtime.fit(max(room, len(tokens)))
        llm = self.runtime.llm
        llm.reset()
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)])

    def decode(self, token: int) -> Any:
        import numpy as np

        llm = self.runtime.llm
        if llm.n_tokens >= self.runtime.context:
            raise InvalidInputError(f"generation ran past llama.cpp's context of {self.runtime.context} tokens")
        llm.eval([int(token)])
        return np.array(llm.scores[llm.n_tokens - 1])


def streamed_weight_bytes(path: Path) -> int:
    """The bytes one decoded token reads: every tensor but the token embedding table, of which a
    token reads one row, unless the output layer is that same table (tied embeddings)."""
    import gguf

    tensors = {tensor.name: int(tensor.n_bytes) for tensor in gguf.GGUFReader(str(path)).tensors}
    total = sum(tensors.values())
    if "output.weight" in tensors:  # untied: the embedding table is only gathered from
        total -= tensors.get("token_embd.weight", 0)
    return total
