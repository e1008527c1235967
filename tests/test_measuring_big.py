"""Big models measured in proportion: the gzip size sampled above a threshold, the batch
timing within a time budget, the measuring child's whole peak RSS, and a child for an
ONNX artifact that imports no other framework."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compressor import builtin
from compressor.measuring import time_batch
from compressor.models import Artifact, MeasureSettings, TensorSpec
from compressor.worker import measure_isolated, measuring_environment, write_request

QUICK = {"warmup": 2, "min_iterations": 3, "min_seconds": 0.0}


def pruned_weights(path: Path, layers: int, layer_bytes: int) -> bytes:
    """fp32 'layers' whose share of zeros rises from 0 to 95% along the file, as in a
    model pruned harder in its later layers: the compressibility changes along the file."""
    rng = np.random.default_rng(0)
    parts = []
    for index in range(layers):
        weight = rng.standard_normal(layer_bytes // 4).astype(np.float32)
        weight[rng.random(weight.size) < 0.95 * index / (layers - 1)] = 0
        parts.append(weight.tobytes())
    data = b"".join(parts)
    path.write_bytes(data)
    return data


def test_small_files_keep_the_exact_gzip_size(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    data = pruned_weights(path, 4, 256 << 10)
    metrics = builtin.size_metrics(Artifact("x", path, "bin"))
    assert metrics["size_gzip_method"] == "exact"
    assert metrics["size_gzip_bytes"] == len(gzip.compress(data, compresslevel=6, mtime=0))
    assert metrics["size_bytes"] == len(data)


def test_big_files_get_a_sampled_estimate_within_two_percent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 12 MiB stands for a big model: threshold 1 MiB, 64 chunks of 32 KiB (a 17% sample).
    monkeypatch.setattr(builtin, "GZIP_EXACT_MAX_BYTES", 1 << 20)
    monkeypatch.setattr(builtin, "GZIP_SAMPLE_CHUNK_BYTES", 32 << 10)
    weights, graph = tmp_path / "model.onnx.data", tmp_path / "model.onnx"
    pruned_weights(weights, 24, 512 << 10)
    graph.write_bytes(b"graph" * 1000)
    artifact = Artifact("onnx", graph, "onnx", (weights,))
    metrics = builtin.size_metrics(artifact)
    exact = builtin.gzip_size(graph) + builtin.gzip_size(weights)
    assert metrics["size_gzip_method"] == "sampled"
    assert abs(metrics["size_gzip_bytes"] - exact) / exact < 0.02, (metrics["size_gzip_bytes"], exact)
    # Deterministic: the same file, the same figure.
    assert builtin.size_metrics(artifact) == metrics
    # The zeros grow along the file: the first chunks alone would be far off.
    head = tmp_path / "head"
    head.write_bytes(weights.read_bytes()[: 2 << 20])
    assert builtin.gzip_size(head) * weights.stat().st_size / head.stat().st_size > 1.2 * exact


def matmul_chain(path: Path, layers: int = 8, tokens: int = 128, width: int = 512) -> None:
    """x [N, tokens, width] through ``layers`` MatMuls: ~0.27 GFLOP an example, slow at batch 32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, current = [], [], "x"
    for index in range(layers):
        weights.append(numpy_helper.from_array(
            (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"w{index}"))
        output = "y" if index == layers - 1 else f"h{index}"
        nodes.append(helper.make_node("MatMul", [current, f"w{index}"], [output]))
        current = output
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", tokens, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", tokens, width])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def chain_call_at(path: Path, calls: list[int]) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    row = np.random.default_rng(1).standard_normal((1, 128, 512)).astype(np.float32)

    def call_at(rows: int) -> Any:
        calls.append(rows)
        feeds = {"x": np.repeat(row, rows, axis=0)}
        return lambda: session.run(None, feeds)

    one = call_at(1)
    one()
    started = time.perf_counter()
    for _ in range(3):
        one()
    return call_at, (time.perf_counter() - started) * 1000 / 3


def test_a_slow_batch_is_timed_at_fewer_rows_within_the_budget(tmp_path: Path) -> None:
    matmul_chain(tmp_path / "chain.onnx")
    calls: list[int] = []
    call_at, row_ms = chain_call_at(tmp_path / "chain.onnx", calls)
    calls.clear()
    # Today's defaults (5 warm-up calls, 30 timed) at batch 32: 36 calls of ~32 rows each.
    settings = MeasureSettings(options={"batch_seconds": 20 * row_ms / 1000})
    started = time.perf_counter()
    metrics = time_batch(call_at, settings, row_ms)
    elapsed = time.perf_counter() - started
    rows = metrics["batch_size"]
    assert 2 <= rows < 32 and calls[-1] == rows, (metrics, calls)
    assert f"timed at batch {rows}, not 32" in metrics["batch_note"] and "batch_seconds" in metrics["batch_note"]
    timing = metrics["latency_batch_ms"]
    assert timing["iterations"] >= 1 and timing["throughput_per_s"] > 0
    # Bounded by the budget (a call of slack), far from the 36 x 32 rows of a full batch pass.
    assert elapsed < 20 * row_ms / 1000 + 2 * timing["p50"] / 1000 + 0.5, (elapsed, row_ms, timing)
    assert elapsed < 36 * 32 * row_ms / 1000 / 4


def test_a_batch_that_cannot_fit_the_budget_is_not_run(tmp_path: Path) -> None:
    matmul_chain(tmp_path / "chain.onnx", layers=2)
    calls: list[int] = []
    call_at, row_ms = chain_call_at(tmp_path / "chain.onnx", calls)
    calls.clear()
    metrics = time_batch(call_at, MeasureSettings(options={"batch_seconds": row_ms / 1000}), row_ms)
    assert calls == [] and "latency_batch_ms" not in metrics and "batch_size" not in metrics
    assert metrics["batch_note"].startswith("not timed at batch 32 nor 2: ")


def test_the_budget_reaches_the_report_through_the_measuring_child(tmp_path: Path) -> None:
    matmul_chain(tmp_path / "chain.onnx")
    settings = MeasureSettings(**QUICK, options={"batch_seconds": 0.2})
    result = measure_isolated(Artifact("onnx", tmp_path / "chain.onnx", "onnx"), None, (), settings,
                              plugin="onnx")
    metrics = result.metrics
    assert metrics["batch_size"] < 32 and "not 32" in metrics["batch_note"], metrics.get("batch_note")
    assert metrics["latency_batch_ms"]["iterations"] >= 1
    assert metrics["measure_peak_rss_bytes"] >= metrics["peak_rss_batch_bytes"] >= metrics["peak_rss_bytes"]


def tile_model(path: Path, repeats: int) -> None:
    """x [N, 16] tiled to [N, 16 x repeats] then averaged: 4 MB an example for 65536 repeats,
    so a batch of 32 needs 128 MB more than one example does."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Tile", ["x", "repeats"], ["wide"]),
             helper.make_node("ReduceMean", ["wide"], ["y"], axes=[1], keepdims=1)]
    graph = helper.make_graph(
        nodes, "tile", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(np.array([1, repeats], dtype=np.int64), "repeats")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


#: Frameworks a measuring child of an ONNX artifact has no use for.
FOREIGN_FRAMEWORKS = ("torch", "tensorflow", "keras", "tf_keras", "transformers", "ai_edge_litert", "fasttext")


def test_the_child_reports_the_peak_of_its_batch_pass_and_imports_only_onnx(tmp_path: Path) -> None:
    model = tmp_path / "tile.onnx"
    tile_model(model, 65536)
    exchange = tmp_path / "exchange"
    exchange.mkdir()
    settings = MeasureSettings(**QUICK, batch_size=32)
    inputs = (TensorSpec("x", (None, 16), "float32"),)
    write_request(exchange, Artifact("onnx", model, "onnx"), None, inputs, settings, plugin="onnx")
    # The child as the worker starts it, listing the modules it imported when it is done.
    probe = ("import json, sys\nfrom compressor import measure_child\nstatus = measure_child.main(sys.argv[1:])\n"
             "print(json.dumps(sorted(sys.modules)))\nsys.exit(status)\n")
    done = subprocess.run([sys.executable, "-P", "-c", probe, str(exchange)], capture_output=True, text=True,
                          env=measuring_environment(settings), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    modules = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "onnxruntime" in modules
    assert [name for name in FOREIGN_FRAMEWORKS if name in modules] == []
    metrics = json.loads((exchange / "result.json").read_text())["metrics"]
    assert metrics["batch_size"] == 32 and "batch_note" not in metrics
    # One example is 4 MB of tiles, a batch of 32 is 128 MB: only the batch pass made the peak.
    assert metrics["peak_rss_batch_bytes"] - metrics["peak_rss_bytes"] > 100 << 20, metrics
    assert metrics["measure_peak_rss_bytes"] >= metrics["peak_rss_batch_bytes"]
    assert metrics["measure_peak_rss_bytes"] - metrics["peak_rss_bytes"] > 100 << 20


def test_the_lifetime_peak_keeps_memory_freed_before_the_end() -> None:
    """Memory a pass allocated and freed again still counts at the end: the kernel's mark, not a sample."""
    probe = ("import numpy as np\nfrom compressor.memory import lifetime_peak_rss_bytes, peak_rss_bytes, "
             "reset_peak_rss\nbefore = peak_rss_bytes()\nwide = np.ones(64 << 20, dtype=np.uint8)\ndel wide\n"
             "reset_peak_rss()\nprint(peak_rss_bytes() - before, lifetime_peak_rss_bytes() - before)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    after_reset, lifetime = (int(value) for value in done.stdout.split())
    assert lifetime > 60 << 20 and after_reset < 30 << 20, done.stdout
