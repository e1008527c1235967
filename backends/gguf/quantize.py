"""Quantizing a GGUF file with llama.cpp (``llama_model_quantize`` of llama-cpp-python), and
what a GGUF file holds (its file type and tensor types), read from its header.

llama.cpp quantizes every 2-D weight to the mode's type, except where its rules choose
another (``q4_k_m`` keeps half the ``attn_v``/``ffn_down`` tensors in ``q6_k``; the output
and embedding tensors get their own types) and where a row's length does not divide into
the type's blocks (256 values for the k-quants): those fall back to a legacy type, which the
tensor type counts in the report show.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from compressor.plugin import (
    CompressionError,
    InvalidInputError,
    first_line,
    native_output_silenced,
)

#: compressor's mode -> llama.cpp's ftype (``LLAMA_FTYPE_MOSTLY_*``), and the shared
#: vocabulary's modes that mean the same (documented in docs/backends/gguf.md).
FTYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "fp16": "F16"}
ALIASES = {"dynamic": "q8_0", "int4": "q4_0"}
#: Share of fp32 bytes each mode keeps (bits per weight / 32, scales included).
SIZE_SHARES = {"fp16": 0.5, "q8_0": 0.27, "dynamic": 0.27, "q5_k_m": 0.18, "q4_k_m": 0.16, "q4_0": 0.15,
               "int4": 0.15}
#: Tensor types of an unquantized file (``file_facts``' names).
FLOAT_TENSOR_TYPES = ("f32", "f16", "bf16")


def ftype_name(mode: str) -> str:
    return FTYPES[ALIASES.get(mode, mode)]


def quantize_file(source: Path, target: Path, mode: str, threads: int) -> None:
    """Run llama.cpp's quantizer (call it in ``run_in_fork``: a native crash stays in the child)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name(mode)}")
    params.nthread = threads
    with native_output_silenced():  # llama.cpp prints every tensor it quantizes
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise CompressionError(f"llama.cpp's quantizer returned {status} for {ftype_name(mode)}")


def file_facts(path: Path) -> dict[str, Any]:
    """The file's architecture, file type and tensor count per GGML type, from its header."""
    from gguf import GGUFReader, LlamaFileType

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as error:
        raise InvalidInputError(f"is not a readable GGUF file ({first_line(error)})", path) from None
    counts = Counter(tensor.tensor_type.name.lower() for tensor in reader.tensors)
    facts: dict[str, Any] = {"tensor_types": dict(sorted(counts.items())), "tensor_count": len(reader.tensors)}
    for key, name in (("general.architecture", "architecture"), ("general.file_type", "file_type")):
        field = reader.get_field(key)
        if field is not None:
            facts[name] = field.contents()
    if isinstance(facts.get("file_type"), int):
        try:
            facts["file_type"] = LlamaFileType(facts["file_type"]).name.removeprefix("MOSTLY_")
        except ValueError:
            facts["file_type"] = str(facts["file_type"])
    return facts
