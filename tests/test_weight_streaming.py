"""The TorchScript export with its weights written one tensor at a time (issue 27's memory).

Each model here is exported twice, through the exporter as torch ships it and through
:func:`compressor_frontends.pytorch.weight_streaming.streamed_weights`: the graphs must have the
same nodes, inputs and outputs, the same initializer values, and compute the same outputs to
the bit; the module and the exporter are left as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compressor.models import Context


def _causal_lm(folder: Path, family: str = "Llama", **config: Any) -> Any:
    """A two-layer transformers ``{family}ForCausalLM`` saved in ``folder`` and loaded by the front end."""
    import torch
    import transformers

    from compressor_frontends.pytorch.hf import load_transformers

    torch.manual_seed(0)
    settings = getattr(transformers, f"{family}Config")(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=64,
        vocab_size=300, max_position_embeddings=64, **config)
    getattr(transformers, f"{family}ForCausalLM")(settings).eval().save_pretrained(folder, safe_serialization=True)
    return load_transformers(folder, ())[0]


def _exported_twice(export: Callable[[], Any], monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """(plain, streamed): ``export()`` through torch's exporter alone, then as compressor runs it."""
    import compressor_frontends.pytorch.kv_export as kv_export
    import compressor_frontends.pytorch.weight_streaming as streaming

    streamed = export()
    with monkeypatch.context() as patched:
        for owner in (kv_export, streaming):
            patched.setattr(owner, "streamed_weights", lambda module, target: contextlib.nullcontext())
        plain = export()
    return plain, streamed


def _initializers(graph: Any) -> list[tuple[Any, ...]]:
    from onnx import numpy_helper

    return sorted((tuple(tensor.dims), tensor.data_type,
                   hashlib.sha1(numpy_helper.to_array(tensor).tobytes()).hexdigest())
                  for tensor in graph.graph.initializer)


def _same_graph(plain: Any, streamed: Any, feeds: dict[str, Any]) -> None:
    import onnxruntime as ort

    assert [node.op_type for node in streamed.graph.node] == [node.op_type for node in plain.graph.node]
    assert [value.name for value in streamed.graph.input] == [value.name for value in plain.graph.input]
    assert [value.name for value in streamed.graph.output] == [value.name for value in plain.graph.output]
    assert _initializers(streamed) == _initializers(plain)
    assert not any(node.op_type == "Transpose" and any(name.endswith("weight") for name in node.input)
                   for node in streamed.graph.node)
    outputs = [ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
               for graph in (plain, streamed)]
    for expected, found in zip(*outputs):
        np.testing.assert_array_equal(found, expected)


def _cache_feeds(graph: Any) -> dict[str, Any]:
    generator = np.random.default_rng(0)
    feeds: dict[str, Any] = {"input_ids": generator.integers(0, 300, (2, 4)),
                             "attention_mask": np.ones((2, 7), np.int64),
                             "position_ids": np.tile(np.arange(3, 7), (2, 1))}
    for value in graph.graph.input:
        if value.name.startswith("past_key_values."):
            feeds[value.name] = generator.standard_normal((2, 2, 3, 8)).astype(np.float32)
    return {value.name: feeds[value.name] for value in graph.graph.input}


@pytest.mark.parametrize("build", [_causal_lm, lambda folder: _causal_lm(folder, tie_word_embeddings=True),
                                   lambda folder: _causal_lm(folder, "Qwen2")],
                         ids=["llama", "llama-tied", "qwen2-biases"])
def test_a_causal_lm_exported_with_its_cache_streams_the_same_graph(tmp_path: Path, build: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from compressor_frontends.pytorch.kv_export import export_with_cache

    model = build(tmp_path / "model")
    encode = torch._C.Graph._export_onnx
    context = Context(workdir=tmp_path)
    plain, streamed = _exported_twice(lambda: export_with_cache(model, context)[0], monkeypatch)
    _same_graph(plain, streamed, _cache_feeds(plain))
    assert torch._C.Graph._export_onnx is encode
    assert not any(hasattr(layer, "weight_by_view") or "forward" in vars(layer) for layer in model.module.modules())


def _mixed_module() -> Any:
    """A module with a 2-D Linear with bias (exported as Gemm), a 3-D one without, one whose
    weight a pruning hook sets on each call, and a weight the module transposes itself."""
    import torch
    import torch.nn.utils.prune

    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.flat = torch.nn.Linear(12, 16)
            self.sequence = torch.nn.Linear(16, 16, bias=False)
            self.pruned = torch.nn.Linear(16, 8)
            torch.nn.utils.prune.l1_unstructured(self.pruned, "weight", amount=0.5)
            self.own = torch.nn.Parameter(torch.randn(8, 5))

        def forward(self, features: Any) -> Any:
            hidden = self.flat(features).relu()
            hidden = self.sequence(hidden.unsqueeze(1).expand(-1, 3, -1))
            return self.pruned(hidden) @ self.own

    torch.manual_seed(0)
    return Mixed().eval()


def test_a_module_with_gemm_hooks_and_its_own_matmuls_streams_the_same_graph(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from compressor_frontends.pytorch.export import export_onnx
    from compressor_frontends.pytorch.model import TorchModel
    from compressor_frontends.pytorch.shapes import SampleShape

    module = _mixed_module()
    model = TorchModel(module=module, input_names=("features",), output_names=(),
                       sample_shapes=(SampleShape("features", (1, 12), "float32"),))
    context = Context(workdir=tmp_path)
    plain, streamed = _exported_twice(lambda: export_onnx(model, context)[0], monkeypatch)
    features = np.random.default_rng(1).standard_normal((4, 12)).astype(np.float32)
    _same_graph(plain, streamed, {plain.graph.input[0].name: features})
    with torch.no_grad():
        expected = module(torch.from_numpy(features)).numpy()
    import onnxruntime as ort

    found = ort.InferenceSession(streamed.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {streamed.graph.input[0].name: features})[0]
    np.testing.assert_allclose(found, expected, rtol=1e-5, atol=1e-5)
    assert "Gemm" in {node.op_type for node in streamed.graph.node}


def test_a_large_export_keeps_its_weights_in_one_file_beside_the_graph(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    from compressor_frontends.pytorch.kv_export import export_with_cache

    monkeypatch.setenv("COMPRESSOR_LARGE_MODEL_BYTES", "1000")
    model = _causal_lm(tmp_path / "model")
    graph, path = export_with_cache(model, Context(workdir=tmp_path))
    assert graph is None and path is not None
    assert sorted(entry.name for entry in path.parent.iterdir()) == ["exported.onnx", "exported.onnx.data"]
    loaded = onnx.load(str(path))
    weights = sum(parameter.numel() * 4 for parameter in model.module.parameters())
    assert (path.parent / "exported.onnx.data").stat().st_size >= 0.95 * weights
    assert path.stat().st_size < 200_000
    assert {tensor.name for tensor in loaded.graph.initializer} >= {"model.model.embed_tokens.weight"}
