"""An ``export genai`` variant saved: onnxruntime-genai's model builder run on the
transformers folder, its output folder the artifact.

The builder (``onnxruntime_genai.models.builder``: ``parse_extra_options`` then
``create_model``) reads the folder with transformers, writes ``model.onnx`` and its external
data, ``genai_config.json`` and the tokenizer files into the folder it is given, and keeps its
temporary files in a cache folder (here in a scratch folder, removed afterwards). It runs in a
fresh Python process (:mod:`compressor_onnx.genai_child`), not beside the model this process
loaded: its own peak resident set comes back (``genai_builder_peak_rss_bytes``) and counts in
the variant's ``compress_peak_rss_bytes``. It prints its progress: that is kept from the
user's terminal and shown only in the one-line error of a failure (its traceback with
``--debug``). It runs on the CPU execution provider, offline (no Hugging Face token is read).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compressor.plugin import (
    Artifact,
    CompressionError,
    CompressorError,
    Context,
    UnsupportedError,
    note_child_peak,
    run_python_child,
    scratch_folder,
)
from compressor_onnx.genai import GENAI_FORMAT, GenaiPlan
from compressor_onnx.genai_child import REQUEST, RESULT, UNSUPPORTED

#: What the builder writes besides the graph: what onnxruntime-genai's generator reads.
CONFIG_FILE = "genai_config.json"


def save_genai(plan: GenaiPlan, destination: Path, context: Context) -> Artifact:
    """Build ``plan`` into the folder ``destination`` (a new folder in the staging area)."""
    destination.mkdir()
    context.progress(f"onnxruntime-genai's builder: {plan.precision}", None)
    with scratch_folder() as exchange:
        builder_peak = _build(plan, destination, exchange)
    config = json.loads((destination / CONFIG_FILE).read_text(encoding="utf-8"))
    decoder = config["model"]["decoder"]
    files = sorted(path.name for path in destination.iterdir())
    metadata: dict[str, Any] = {
        "genai_precision": plan.precision,
        "genai_builder_options": " ".join(f"{key}={value}" for key, value in plan.options),
        "genai_files": files,
        "genai_context_length": config["model"].get("context_length"),
        "genai_layers": decoder.get("num_hidden_layers"),
        "genai_builder_peak_rss_bytes": builder_peak,
    }
    return Artifact("onnx", destination, GENAI_FORMAT, metadata=metadata,
                    notes=(f"a folder for onnxruntime-genai ({', '.join(files)})",))


def _build(plan: GenaiPlan, output: Path, exchange: Path) -> int:
    """Run the builder in a child process, its files in the scratch folder ``exchange``; return
    the child's peak resident set (recorded for the variant's peak too)."""
    cache, temporary = exchange / "cache", exchange / "tmp"
    cache.mkdir()
    temporary.mkdir()  # the child's TMPDIR: what it leaves there goes with the scratch folder
    options = [f"{key}={value}" for key, value in (("hf_token", "false"), *plan.options)]
    request = {"source": str(plan.source), "output": str(output), "precision": plan.precision,
               "cache": str(cache), "options": options}
    (exchange / REQUEST).write_text(json.dumps(request), encoding="utf-8")
    printed_file = exchange / "printed.txt"
    status = run_python_child("compressor_onnx.genai_child", [str(exchange)], printed_file,
                              step="export genai", environment={"TMPDIR": str(temporary)})
    printed = printed_file.read_text(encoding="utf-8", errors="replace")
    result_file = exchange / RESULT
    if not result_file.is_file():
        raise CompressionError(f"onnxruntime-genai's builder exited with status {status} and no result"
                               f"{_last_line(printed)}")
    result = json.loads(result_file.read_text(encoding="utf-8"))
    peak = int(result["peak_rss_bytes"])
    note_child_peak(peak)
    failure = result.get("error")
    if failure is not None:
        error: CompressorError
        if failure["kind"] == UNSUPPORTED:
            error = UnsupportedError(f"onnxruntime-genai's builder: {failure['message']}", plan.source)
        else:
            error = CompressionError(f"onnxruntime-genai's builder failed: {failure['message']}"
                                     f"{_last_line(printed)}")
        error.plugin_tracebacks = [f"onnxruntime-genai's builder (in its own process):\n{failure['traceback']}"]
        raise error
    if not (output / CONFIG_FILE).is_file():
        raise CompressionError(f"onnxruntime-genai's builder wrote no {CONFIG_FILE}{_last_line(printed)}")
    return peak


def _last_line(printed: str) -> str:
    lines = [line.strip() for line in printed.replace("\r", "\n").splitlines() if line.strip()]
    return f" (it printed last: {lines[-1][:200]})" if lines else ""
