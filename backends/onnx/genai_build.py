"""An ``export genai`` variant saved: onnxruntime-genai's model builder run on the
transformers folder, its output folder the artifact.

The builder (``onnxruntime_genai.models.builder``: ``parse_extra_options`` then
``create_model``) reads the folder with transformers, writes ``model.onnx`` and its external
data, ``genai_config.json`` and the tokenizer files into the folder it is given, and keeps its
temporary files in a cache folder (here a scratch folder, removed afterwards). It prints its
progress: that is kept from the user's terminal and shown only in the one-line error of a
failure. It runs on the CPU execution provider, offline (no Hugging Face token is read).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from compressor.plugin import (
    Artifact,
    CompressionError,
    Context,
    UnsupportedError,
    first_line,
    native_output_silenced,
    scratch_folder,
)
from compressor_onnx.genai import GENAI_FORMAT, GenaiPlan

#: What the builder writes besides the graph: what onnxruntime-genai's generator reads.
CONFIG_FILE = "genai_config.json"


def save_genai(plan: GenaiPlan, destination: Path, context: Context) -> Artifact:
    """Build ``plan`` into the folder ``destination`` (a new folder in the staging area)."""
    destination.mkdir()
    context.progress(f"onnxruntime-genai's builder: {plan.precision}", None)
    with scratch_folder() as cache:
        _build(plan, destination, cache)
    config = json.loads((destination / CONFIG_FILE).read_text(encoding="utf-8"))
    decoder = config["model"]["decoder"]
    files = sorted(path.name for path in destination.iterdir())
    metadata: dict[str, Any] = {
        "genai_precision": plan.precision,
        "genai_builder_options": " ".join(f"{key}={value}" for key, value in plan.options),
        "genai_files": files,
        "genai_context_length": config["model"].get("context_length"),
        "genai_layers": decoder.get("num_hidden_layers"),
    }
    return Artifact("onnx", destination, GENAI_FORMAT, metadata=metadata,
                    notes=(f"a folder for onnxruntime-genai ({', '.join(files)})",))


def _build(plan: GenaiPlan, output: Path, cache: Path) -> None:
    import onnxruntime_genai.models.builder as builder

    options = [f"{key}={value}" for key, value in (("hf_token", "false"), *plan.options)]
    printed = io.StringIO()
    try:
        with native_output_silenced(), contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            prepared = builder.parse_extra_options(None, str(plan.source), str(output), plan.precision, "cpu",
                                                   str(cache), options)
            builder.create_model(None, str(plan.source), str(output), plan.precision, "cpu", str(cache),
                                 **prepared)
    except NotImplementedError as error:
        raise UnsupportedError(f"onnxruntime-genai's builder: {first_line(error)}", plan.source) from error
    except Exception as error:  # noqa: BLE001 - the builder raises ValueError, Exception, torch's errors
        raise CompressionError(f"onnxruntime-genai's builder failed: {first_line(error)}"
                               f"{_last_line(printed.getvalue())}") from error
    if not (output / CONFIG_FILE).is_file():
        raise CompressionError(f"onnxruntime-genai's builder wrote no {CONFIG_FILE}"
                               f"{_last_line(printed.getvalue())}")


def _last_line(printed: str) -> str:
    lines = [line.strip() for line in printed.replace("\r", "\n").splitlines() if line.strip()]
    return f" (it printed last: {lines[-1][:200]})" if lines else ""
