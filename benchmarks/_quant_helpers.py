"""Models and measurements for bench_onnx_quantization.py: a GPT-2-shaped model trained
on the Debian descriptions, a small CNN on scikit-learn digits, and a one-process
harness timing and comparing ONNX files (ours and ONNX Runtime's direct calls)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

THREADS = 1


def session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def sentence_embeddings(path: Path, data: dict[str, Any]) -> Any:
    """Mean-pooled (attention mask) last_hidden_state, one sentence at a time (batch 1)."""
    runner = session(path)
    names = [item.name for item in runner.get_inputs()]
    rows = []
    for row in range(len(data["input_ids"])):
        hidden = runner.run(None, {name: data[name][row : row + 1] for name in names})[0]
        mask = data["attention_mask"][row : row + 1, :, None].astype(np.float32)
        rows.append((hidden * mask).sum(1) / mask.sum(1))
    return np.concatenate(rows)


def nearest(vectors: Any) -> Any:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -2)
    return similarity.argmax(1)


def fidelity(vectors: Any, reference: Any) -> tuple[float, float]:
    """Mean cosine to the reference vectors and nearest-neighbour agreement."""
    cosine = (vectors * reference).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
    return float(cosine.mean()), float((nearest(vectors) == nearest(reference)).mean())


def latencies(paths: dict[str, Path], feeds: dict[str, Any], seconds: float, repeats: int) -> dict[str, float]:
    """Batch-1 p50 ms of each model: ``repeats`` interleaved rounds of ``seconds`` each, median of the p50s."""
    runners = {name: session(path) for name, path in paths.items()}
    results: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, runner in runners.items():
            wanted = {item.name: feeds[item.name] for item in runner.get_inputs()}
            for _ in range(5):
                runner.run(None, wanted)
            times, end = [], time.perf_counter() + seconds
            while time.perf_counter() < end or len(times) < 10:
                start = time.perf_counter()
                runner.run(None, wanted)
                times.append(time.perf_counter() - start)
            results[name].append(1000 * float(np.median(times)))
    return {name: float(np.median(values)) for name, values in results.items()}


def file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def linear_weight_bytes(path: Path) -> int:
    """Bytes of the linear layers' weights: MatMul/Gemm B initializers, MatMulNBits' B, scales
    and zero points, and the int8 weights (with scales) behind DequantizeLinear or MatMulInteger."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    tensors = {t.name: numpy_helper.to_array(t).nbytes for t in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    total = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            total += sum(tensors.get(name, 0) for name in node.input[1:])
        elif node.op_type in ("MatMul", "Gemm", "MatMulInteger"):
            weight = node.input[1]
            source = producers.get(weight)
            if source is not None and source.op_type == "DequantizeLinear":
                total += sum(tensors.get(name, 0) for name in source.input)
            elif node.op_type == "MatMulInteger":
                total += sum(tensors.get(name, 0) for name in (node.input[1], node.input[3]))
            else:
                total += tensors.get(weight, 0)
    return total


def lm_corpus(tokenizer_folder: Path, texts: dict[str, list[str]], sequence: int, vocabulary: int) -> dict[str, Any]:
    """MiniLM's WordPiece ids of each text set, renumbered so that the ``vocabulary - 2``
    tokens most frequent in ``texts["train"]`` keep their own ids (0 is padding, 1 unknown):
    ``{name: (input_ids, attention_mask)}``. A smaller output layer trains fast on 2 cores."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_folder))
    encoded = {name: tokenizer(lines, padding="max_length", truncation=True, max_length=sequence,
                               return_tensors="np") for name, lines in texts.items()}
    train = encoded["train"]
    counts = np.bincount(train["input_ids"][train["attention_mask"] == 1], minlength=tokenizer.vocab_size)
    kept = np.argsort(counts)[::-1][: vocabulary - 2]
    mapping = np.ones(tokenizer.vocab_size, dtype=np.int64)
    mapping[kept] = np.arange(2, vocabulary)
    corpus = {}
    for name, batch in encoded.items():
        mask = batch["attention_mask"].astype(np.int64)
        corpus[name] = (np.where(mask == 1, mapping[batch["input_ids"]], 0), mask)
    return corpus


def train_gpt2(folder: Path, ids: Any, mask: Any, vocabulary: int, seconds: float, sequence: int) -> dict[str, Any]:
    """A 4-layer GPT-2 (n_embd 128) trained for ``seconds`` on ``ids``, saved as a transformers folder."""
    import torch
    import transformers

    # One thread: with a second busy process on this 2-core VM, two OpenMP threads ran 10x slower.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocabulary, n_positions=sequence, n_embd=128, n_layer=4,
                                     n_head=4, bos_token_id=1, eos_token_id=1)
    model = transformers.GPT2LMHeadModel(config)
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    labels = ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    steps, batch, started = 0, 16, time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    loss = torch.tensor(float("nan"))
    while time.perf_counter() - started < seconds:
        pick = torch.randint(0, len(ids), (batch,), generator=generator)
        loss = model(input_ids=ids[pick], attention_mask=mask[pick], labels=labels[pick]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_input_names": ["input_ids", "attention_mask"]}))
    return {"steps": steps, "seconds": round(time.perf_counter() - started), "batch": batch,
            "final_loss": float(loss.detach()), "parameters": sum(p.numel() for p in model.parameters())}


def digits_cnn(folder: Path) -> tuple[Path, Path, Path, float]:
    """A small conv net trained on scikit-learn digits, exported to ONNX; eval and calibration data."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(0)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    train_x, test_x, train_y, test_y = train_test_split(x, digits.target, test_size=0.3, random_state=0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, padding=1),
        torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(64 * 16, 128),
        torch.nn.ReLU(), torch.nn.Linear(128, 10),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    inputs, labels = torch.from_numpy(train_x), torch.from_numpy(train_y).long()
    for _ in range(15):
        for start in range(0, len(inputs), 64):
            loss = torch.nn.functional.cross_entropy(net(inputs[start : start + 64]), labels[start : start + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    path = folder / "digits-cnn.onnx"
    torch.onnx.export(net, (torch.from_numpy(test_x[:1]),), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    with torch.no_grad():
        accuracy = float((net(torch.from_numpy(test_x)).argmax(1).numpy() == test_y).mean())
    np.savez(folder / "cnn-eval.npz", x=test_x, y=test_y)
    np.savez(folder / "cnn-calibration.npz", x=train_x[:256])
    return path, folder / "cnn-eval.npz", folder / "cnn-calibration.npz", accuracy
