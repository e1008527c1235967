"""The process that runs onnxruntime-genai's model builder: ``python -P -c ... compressor_onnx.genai_child
FOLDER`` (:func:`compressor_onnx.genai_build.save_genai` starts it with ``run_python_child``).

A fresh interpreter, not a fork: the builder loads the transformers folder itself, and the
model compressor loaded stays in the parent, out of this process's memory. It reads
``request.json`` in FOLDER (:data:`REQUEST`), runs the builder, and writes ``result.json``
(:data:`RESULT`): its own peak resident set (``VmHWM``, new with ``exec``) and, where the
builder raised, what it raised (``unsupported`` for its ``NotImplementedError``, else
``failed``), the first line and the traceback. What it prints goes to the file the parent
gave as its stdout and stderr, never the user's terminal; the traceback goes in the result,
so that what the builder printed last stays the last line of that file.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: What the parent asks: ``source``, ``output``, ``precision``, ``cache`` (folder paths and the
#: builder's precision) and ``options`` (the builder's ``KEY=VALUE`` extra options).
REQUEST = "request.json"
#: What this process found: ``peak_rss_bytes`` and, on a failure, ``error``.
RESULT = "result.json"
#: ``error["kind"]`` of the builder's ``NotImplementedError`` (what it cannot export) and of
#: any other exception.
UNSUPPORTED, FAILED = "unsupported", "failed"


def build(request: dict[str, Any]) -> None:
    """The builder on the request: ``parse_extra_options`` then ``create_model``, on the CPU."""
    import onnxruntime_genai.models.builder as builder

    source, output, precision, cache = (request[key] for key in ("source", "output", "precision", "cache"))
    prepared = builder.parse_extra_options(None, source, output, precision, "cpu", cache, request["options"])
    builder.create_model(None, source, output, precision, "cpu", cache, **prepared)


def main(argv: Sequence[str]) -> int:
    from compressor.plugin import first_line, peak_rss_bytes

    folder = Path(argv[0])
    result: dict[str, Any] = {}
    try:
        build(json.loads((folder / REQUEST).read_text(encoding="utf-8")))
    except Exception as error:  # noqa: BLE001 - the builder raises ValueError, Exception, torch's errors
        result["error"] = {"kind": UNSUPPORTED if isinstance(error, NotImplementedError) else FAILED,
                           "type": type(error).__name__, "message": first_line(error),
                           "traceback": "".join(traceback.format_exception(error)).rstrip()}
    result["peak_rss_bytes"] = peak_rss_bytes()  # never reset here: the whole process's
    written = folder / f"{RESULT}.part"
    written.write_text(json.dumps(result), encoding="utf-8")
    os.replace(written, folder / RESULT)  # whole or absent: a killed child leaves no half result
    return 0
