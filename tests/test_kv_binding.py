"""The onnx runtime's decode loop with I/O binding (issue 27): ONNX Runtime writes the logits
and the present into arrays the runtime allocates, and the present is fed back as the next
step's past where it lies. The outputs are what ``session.run`` returns, and decoding with
the cache gives what recomputing the whole sequence gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from test_kv_fusion import VOCABULARY, tiny_llama

from compressor.generation import decoder_of, generate
from compressor.models import Artifact, Context, MeasureSettings


def test_bound_decoding_matches_unbound_and_full_recompute(tmp_path: Path) -> None:
    from compressor_onnx.export import export_graph
    from compressor_onnx.runtime import OnnxRuntime

    graph, _ = export_graph(tiny_llama(tmp_path / "model"), Context(workdir=tmp_path))
    assert "GroupQueryAttention" in {node.op_type for node in graph.graph.node}
    onnx.save_model(graph, str(tmp_path / "model.onnx"))
    artifact = Artifact("onnx", tmp_path / "model.onnx", "onnx")
    bound, unbound = OnnxRuntime(artifact, MeasureSettings()), OnnxRuntime(artifact, MeasureSettings())
    assert bound._bound.binding is not None
    unbound._bound.binding = None  # session.run, as before binding
    prompt = np.random.default_rng(3).integers(0, VOCABULARY, 9)
    with_binding, without = generate(decoder_of(bound), prompt, 12), generate(decoder_of(unbound), prompt, 12)
    assert with_binding.tokens == without.tokens
    # Step by step: the bound decoder's logits are the unbound one's, and a full pass's.
    decoder, reference = decoder_of(bound), decoder_of(unbound)
    assert np.array_equal(decoder.prefill(prompt), reference.prefill(prompt))
    sequence = list(prompt)
    for token in with_binding.tokens[:-1]:
        logits, expected = decoder.decode(token), reference.decode(token)
        sequence.append(token)
        assert np.array_equal(logits, expected)
        full = bound.run({"input_ids": np.array([sequence], dtype=np.int64)})["logits"][0, -1]
        assert np.abs(logits - full).max() < 1e-4
    # A padded batch of two (core's one-pass measurement): every output as session.run gives it.
    ids = np.random.default_rng(4).integers(0, VOCABULARY, (2, 7))
    mask = np.ones((2, 7), np.int64)
    mask[0, :2] = 0
    first, second = bound.run({"input_ids": ids, "attention_mask": mask}), unbound.run(
        {"input_ids": ids, "attention_mask": mask})
    assert set(first) == set(second) and all(np.array_equal(first[name], second[name]) for name in first)
    assert first["present.1.value"].shape == (2, 2, 7, 8)
