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

Where the builder quantizes (int4, int8), its ``Model.to_nbits`` serializes the whole float
graph in memory (``ir.to_proto``) while the transformers model it read is still held: two
copies of the weights, 2.46x W at 1.1 B. Here the float weights go to a file in the cache
folder first and the builder's graph reads them from there (:func:`float_weights_on_disk`):
its quantizer then holds one float weight at a time, and the output is the same bytes
(0.39x W at 1.1 B).
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
#: The weight files transformers maps (safetensors; ``.bin`` through ``torch.load(mmap=True)``):
#: the pages read of them while the float weights are written out are dropped every
#: :data:`RELEASE_EVERY_BYTES` (they would stay resident, a second copy of the weights).
WEIGHT_FILES = (".safetensors", ".bin")
#: How many bytes of float weights are written between two such drops (one costs about 70 ms
#: at 4.4 GB mapped: a walk of the whole mapping).
RELEASE_EVERY_BYTES = 256 * 2**20


def build(request: dict[str, Any]) -> None:
    """The builder on the request: ``parse_extra_options`` then ``create_model``, on the CPU."""
    import onnxruntime_genai.models.builder as builder

    source, output, cache = (str(Path(request[key]).absolute()) for key in ("source", "output", "cache"))
    precision = request["precision"]
    prepared = builder.parse_extra_options(None, source, output, precision, "cpu", cache, request["options"])
    with float_weights_on_disk(Path(cache) / "float-weights"):
        builder.create_model(None, source, output, precision, "cpu", cache, **prepared)


def builders_model_class() -> Any:
    """The builder's ``Model`` base class as the builder imports it: ``builders.base``, a module
    of its own (``onnxruntime_genai.models`` puts its folder on ``sys.path``), not
    ``onnxruntime_genai.models.builders.base``."""
    import importlib

    import onnxruntime_genai.models.builder  # noqa: F401 - puts the builder's folder on sys.path

    return importlib.import_module("builders.base").Model


@contextmanager
def float_weights_on_disk(folder: Path) -> Iterator[None]:
    """While inside, the builder's ``Model.to_nbits`` first writes the graph's float weights
    to ``folder`` (dropping the pages of the mapped weight files as it goes) and points each
    initializer at its bytes there, which lets the transformers tensors go. It then quantizes
    with ``folder`` as the working folder, because the quantizer reads external data relative
    to it; the graph it returns reads from ``folder`` too."""
    import onnx_ir as ir

    from compressor.plugin import release_freed_memory, release_mapped_file_pages

    Model = builders_model_class()  # noqa: N806 - the builder's class, patched while inside
    original = Model.to_nbits

    def to_nbits(self: Any) -> Any:
        folder.mkdir(parents=True, exist_ok=True)
        saved = folder / "float.onnx"
        released_at = 0

        def written(tensor: Any, where: Any) -> None:
            nonlocal released_at
            if where.offset - released_at >= RELEASE_EVERY_BYTES:
                release_mapped_file_pages(WEIGHT_FILES)
                released_at = where.offset

        ir.save(self.model, saved, external_data=f"{saved.name}.data", size_threshold_bytes=0,
                callback=written)
        release_mapped_file_pages(WEIGHT_FILES)
        on_disk = ir.load(saved).graph.initializers
        for name, value in self.model.graph.initializers.items():
            value.const_value = on_disk[name].const_value
        release_freed_memory()
        working_folder = Path.cwd()
        os.chdir(folder)
        try:
            quantized = original(self)
        finally:
            os.chdir(working_folder)
        for value in quantized.graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value.base_dir = folder
        return quantized

    Model.to_nbits = to_nbits
    try:
        yield
    finally:
        Model.to_nbits = original


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
