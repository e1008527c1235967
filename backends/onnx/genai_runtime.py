"""An ``export genai`` artifact (a folder the model builder wrote) run by onnxruntime-genai's
own generator: ``og.Model``, one ``og.Generator`` whose cache onnxruntime-genai keeps.

For core's one-pass measurement it is a language model like the gguf backend's: inputs
``input_ids`` (``[N, T]``) and optionally ``attention_mask``, output ``logits`` ``[N, T,
vocabulary]``; each row is its own sequence (the generator rewound to position 0), of the
positions the mask keeps. Generation goes through :class:`GenaiDecoder`, a
:class:`~compressor.plugin.TokenDecoder`: a prefill appends the prompt to the generator and
reads the graph's logits of every position (the builder's graph computes them all, unless
built with ``prune_lm_head=true``, when the decoder refuses a perplexity rather than give a
wrong one); a decode step appends the one token core chose (the greedy one) and reads the
logits of the next position, so the timed work is the generator's own decode step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compressor.plugin import (
    DECODE_ROOM,
    Artifact,
    InvalidInputError,
    MeasureSettings,
    SequenceRuntime,
    TensorSpec,
    TokenDecoder,
    UnsupportedError,
    first_line,
    native_output_silenced,
)
from compressor_onnx.genai_build import CONFIG_FILE


class GenaiRuntime(SequenceRuntime):
    """A model builder's folder opened by onnxruntime-genai on the CPU."""

    def __init__(self, artifact: Artifact, settings: MeasureSettings) -> None:
        import onnxruntime_genai as og

        self.folder: Path = artifact.path
        try:
            config = json.loads((self.folder / CONFIG_FILE).read_text(encoding="utf-8"))
            model_config = config["model"]
            self.vocabulary = int(model_config["vocab_size"])
            self.context_length = int(model_config.get("context_length") or 0) or None
            self.graph = self.folder / model_config["decoder"]["filename"]
            og_config = og.Config(str(self.folder))
            og_config.clear_providers()  # the CPU
            og_config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": settings.threads, "inter_op_num_threads": 1}}}}))
            with native_output_silenced():
                self.model = og.Model(og_config)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            raise InvalidInputError(f"onnxruntime-genai cannot open it ({first_line(error)})", self.folder) from None
        self.outputs = (TensorSpec("logits", (None, None, self.vocabulary), "float32"),)
        self.generator: Any = None
        self.length = 0  # the cache length the generator was opened with

    def sequence(self, tokens: Any) -> Any:
        """The generator rewound to a new sequence of ``tokens`` (1-D), with room to decode after
        it: the logits of every position, ``[len(tokens), vocabulary]``."""
        import numpy as np

        ids = np.asarray(tokens, dtype=np.int32)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocabulary):
            raise InvalidInputError(f"input_ids hold ids from {int(ids.min())} to {int(ids.max())}; the model's "
                                    f"vocabulary has {self.vocabulary}")
        if self.context_length and len(ids) > self.context_length:
            raise InvalidInputError(f"a sequence has {len(ids)} tokens, more than the model's context of "
                                    f"{self.context_length}")
        try:
            generator = self._generator(len(ids) + DECODE_ROOM)
            generator.append_tokens(ids)
            logits = np.asarray(generator.get_output("logits"))
        except RuntimeError as error:  # onnxruntime-genai's errors (ORT's included) are RuntimeErrors
            raise InvalidInputError(f"onnxruntime-genai refused a sequence of {len(ids)} tokens: "
                                    f"{first_line(error)}", self.folder) from None
        if logits.ndim != 3 or logits.shape[1] != len(ids):
            raise UnsupportedError(f"the graph returns the logits of {logits.shape[1] if logits.ndim == 3 else '?'} "
                                   f"of {len(ids)} prompt positions (built with prune_lm_head=true?): "
                                   "perplexity and one-pass comparison need every position", self.folder)
        return logits[0].astype(np.float32, copy=False)

    def _generator(self, wanted: int) -> Any:
        """The generator, rewound; reopened with a longer cache when ``wanted`` exceeds it."""
        import onnxruntime_genai as og

        if self.generator is not None and wanted <= self.length:
            self.generator.rewind_to(0)
            return self.generator
        length = self.context_for(wanted, self.context_length)  # the cache is allocated whole, up front
        self.generator = None  # the old cache goes before the new one is allocated
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=length, do_sample=False)
        self.generator, self.length = og.Generator(self.model, params), length
        return self.generator

    def sequence_logits(self, ids: Any) -> Any:
        return self.sequence(ids)

    def token_decoder(self) -> TokenDecoder:
        return GenaiDecoder(self)

    def metrics(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {"runtime": f"onnxruntime-genai {version('onnxruntime-genai')} (onnxruntime "
                           f"{version('onnxruntime')}) CPU"}

    def close(self) -> None:
        self.generator = None
        self.model = None


class GenaiDecoder(TokenDecoder):
    """The runtime's generator fed a token at a time; onnxruntime-genai keeps the cache."""

    def __init__(self, runtime: GenaiRuntime) -> None:
        from compressor_onnx.kv_runtime import streamed_weight_bytes

        self.runtime = runtime
        # What one decode step reads, counted as for compressor's own export (embedding tables
        # read by Gather alone left out); the folder's files where the graph cannot be read.
        self.weight_bytes = streamed_weight_bytes(runtime.graph) or sum(
            path.stat().st_size for path in runtime.folder.iterdir() if path.is_file())
        self.max_positions = runtime.context_length

    def prefill(self, ids: Any) -> Any:
        return self.runtime.sequence(ids)

    def decode(self, token: int) -> Any:
        import numpy as np

        runtime = self.runtime
        generator = runtime.generator
        if generator is None or generator.token_count() >= runtime.length:
            raise InvalidInputError(f"generation ran past onnxruntime-genai's cache of {runtime.length} tokens")
        try:
            generator.append_tokens(np.array([token], dtype=np.int32))
            logits = np.asarray(generator.get_logits())
        except RuntimeError as error:
            raise InvalidInputError(f"onnxruntime-genai refused token {token}: {first_line(error)}",
                                    runtime.folder) from None
        return logits[0, -1].astype(np.float32, copy=False)
