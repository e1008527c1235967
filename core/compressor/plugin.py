"""The public plugin API: everything a compressor plugin needs, under stable names.

A backend plugin imports from here and from nowhere else in compressor::

    from compressor.plugin import Backend, Model, Runtime, Technique, hookimpl, ...

``__all__`` is the contract: these names keep their meaning across releases
(a name is deprecated for a release before it goes); every other module of
compressor is private and may change without notice. Importing this module
imports no ML framework. docs/writing-a-plugin.md shows them in use;
:mod:`compressor.testing` checks a backend against the contract.

Hooks
    hookimpl              the decorator that marks a function as a hook implementation
                          (the hooks are in compressor.hookspecs, each with an example)

Declarations (returned by ``compressor_backends``)
    Backend               a backend: its formats, techniques, options, requirements
    Technique             a technique it supports: modes, parameters, data it needs
    Param                 one parameter of a technique, or a backend option
    EVERY_STEP            the ``Technique.requires_data`` key for data every step needs
    QUANTIZE              ``"quantize"``, the shared technique name for quantization
    PRUNE                 ``"prune"``, the shared technique name for pruning
    PQ                    ``"pq"``, the shared technique name for product quantization
    QUANTIZE_MODES        the shared quantize modes, each meaning the same on every backend:
                          fp16; dynamic (int8 weights, activations float or quantized at
                          run time); int8/uint8 (weights and activations, calibrated);
                          int16x8; int4 (4-bit weights in blocks)
    CliFlag               the ``compressor run`` option a technique declares (``Technique.cli``)
    QUANTIZE_OPTION       the shared ``-q/--quantize MODE`` option, one variant per mode
    PRUNE_OPTION          the shared ``--prune S`` option (sets ``sparsity``)
    PQ_OPTION             the shared ``--pq`` switch
    QUANTIZE_SIZE         the shared share of fp32 bytes kept per quantize mode (``size_factor``)
    PQ_SIZE               the share a product-quantized model keeps
    ORDER                 the shared techniques' ``Technique.order`` (distill, prune, lowrank,
                          pq, quantize)

Data (what travels through the hooks)
    Model                 a loaded model; ``handle`` is the backend's own object
    Step                  one validated compression step: technique and parameters
    Artifact              a saved, deployable file and its side files
    Context               what load, compress and save get besides the model
    Dataset               a data file read for a model: features, labels
    TensorSpec            an input or output: name, shape (None: dynamic), dtype
    MeasureSettings       how measurements are taken; ``threads`` and ``options`` for runtimes
    Measurement           what a ``compressor_measure`` hook found
    SampleModel           a small model for ``compressor demo`` and conformance tests
    Runtime               a saved artifact opened for running: named inputs to named outputs
    ProgressCallback      the type of ``Context.progress``: ``progress("calibrating", 0.4)``
                          (a message and a fraction done, or None when unknown)
    KVCacheLayout         how a causal LM's runtime takes and returns its key/value cache
                          (``Runtime.kv_cache``): core then measures it generating
    TokenDecoder          a runtime that keeps its own cache (llama.cpp), fed a token at a time
                          (``Runtime.token_decoder``): measured as generation too
    SequenceRuntime       a Runtime for a model fed one token sequence at a time: ``run`` over
                          rows and the mask, ids checked; the subclass gives ``sequence_logits``
    TOKEN_INPUTS          the inputs such a model takes: ``input_ids`` and an optional mask
    MIN_CONTEXT           the shortest context such a runtime opens (``SequenceRuntime.context_for``)
    DECODE_ROOM           the room a generation's prefill leaves for the tokens decoded after it

Errors (one line and an exit code for the user; anything else is a bug in the plugin)
    CompressorError       the base class; ``CompressorError(message, path)``
    UsageError            exit 2: bad arguments, options, output folder or resources
    UnsafeInputError      exit 3: loading would run code (without ``--trust``) or escape its folder
    InvalidInputError     exit 4: a model or data file is corrupt or does not fit
    UnsupportedError      exit 5: a technique, mode or model this backend cannot handle
    CompressionError      exit 7: applying a step to a valid model failed (that variant fails)
    first_line            a framework exception's first line, for such one-line messages

Helpers
    import_factory        the user's ``package.module:function`` (``--set model_factory=``)
    native_output_silenced  hide what native code writes to stdout/stderr (file descriptors)
    examples_from_data    a Dataset matched to a model's inputs, as batches of feeds
    Examples              what examples_from_data returns: ``take(start, stop)`` gives feeds
    Stopwatch             ``with Stopwatch() as load: ...`` then ``load.ms``
    time_calls            latency statistics of a call, as core times every runtime
    peak_rss_bytes        this process's peak resident memory so far (bytes)
    release_freed_memory  give memory a native library freed back to the OS (glibc's malloc_trim)
    release_mapped_file_pages  drop the pages read of weight files mapped read-only (madvise)
    cpu_info              the CPU's model, cores and the flags that matter to kernels
    python_command        the command line of a fresh Python child that imports nothing
                          from the working directory
    child_environment     the environment for such a child (the parent's import path)
    run_in_fork           run one crash-prone native call in a forked child: a crash or
                          running out of memory becomes a one-line error (its peak RSS counted)
    run_python_child      run ``module.main(argv)`` in a fresh interpreter (not a fork: none of
                          this process's memory) and wait; it dies with this process
    note_child_peak       record such a child's own peak RSS (bytes): it counts in the peak of
                          the phase that started it (``compress_peak_rss_bytes``)
    scratch_folder        ``with scratch_folder() as folder:`` a private folder in $TMPDIR,
                          removed afterwards (or by the next run, if this one is killed)
    STATE_PREFIX          ``"state."``: the option family linking a state output to its input
    detect_task           the task core sees in one output's values (and why)
    declared_task         the task the user declared for an output (``--set task.NAME=``), or None
    label_output          which output the labels of training data train (a LabelOutput)
    LabelOutput           that choice: the output's index and name, and a note for the report
    probe_rows            the example rows label_output looks at, spread over a file
    GENERATION_OPTIONS    the ``--set`` options of generation (prompt_tokens, new_tokens...), for
                          a backend whose runtimes have a key/value cache to declare
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from compressor.children import child_environment, python_command, run_in_fork, run_python_child
from compressor.errors import (
    CompressionError,
    CompressorError,
    InvalidInputError,
    UnsafeInputError,
    UnsupportedError,
    UsageError,
    first_line,
)
from compressor.factories import import_factory
from compressor.feeding import STATE_PREFIX, Examples, examples_from_data
from compressor.generation import GENERATION_OPTIONS
from compressor.hookspecs import hookimpl
from compressor.kv_layout import KVCacheLayout, TokenDecoder
from compressor.measuring import Stopwatch, time_calls
from compressor.memory import (
    note_child_peak,
    peak_rss_bytes,
    release_freed_memory,
    release_mapped_file_pages,
)
from compressor.models import (
    Artifact,
    Context,
    Dataset,
    Measurement,
    MeasureSettings,
    Model,
    ProgressCallback,
    SampleModel,
    Step,
    TensorSpec,
)
from compressor.native import native_output_silenced
from compressor.runtime import Runtime
from compressor.specs import (
    EVERY_STEP,
    PQ,
    PRUNE,
    QUANTIZE,
    QUANTIZE_MODES,
    Backend,
    CliFlag,
    Param,
    Technique,
)
from compressor.task_rules import chosen_task as declared_task
from compressor.tasks import detect as detect_task
from compressor.token_runtime import DECODE_ROOM, MIN_CONTEXT, TOKEN_INPUTS, SequenceRuntime
from compressor.training_labels import LabelOutput, label_output, probe_rows
from compressor.vocabulary import (
    ORDER,
    PQ_OPTION,
    PQ_SIZE,
    PRUNE_OPTION,
    QUANTIZE_OPTION,
    QUANTIZE_SIZE,
)


def cpu_info() -> dict[str, Any]:
    """This machine's CPU: ``{"model": str, "cores": int, "flags": [...]}``.

    ``flags`` holds only the features that change what quantized kernels can do
    (``avx2``, ``fma``, ``avx512f``, ``avx512bw``, ``avx512_vnni``, ``avx_vnni``,
    ``amx_int8``, ``f16c``), e.g. to choose reduced-range int8 without VNNI."""
    from compressor.environment import cpu_info as read_cpu_info

    return read_cpu_info()


@contextmanager
def scratch_folder() -> Iterator[Path]:
    """A folder of this process's own in ``$TMPDIR``, removed on the way out whatever
    happens; named like core's scratch folders, so that one left by a killed run is removed
    by the next run::

        with scratch_folder() as folder:
            converter.write(folder / "model.tmp")
    """
    from compressor import scratch

    with scratch.scratch_folder(scratch.WORK) as folder:
        yield folder


__all__ = [
    # hooks
    "hookimpl",
    # declarations
    "Backend",
    "Technique",
    "Param",
    "CliFlag",
    "QUANTIZE_OPTION",
    "PRUNE_OPTION",
    "PQ_OPTION",
    "QUANTIZE_SIZE",
    "PQ_SIZE",
    "ORDER",
    "EVERY_STEP",
    "QUANTIZE",
    "PRUNE",
    "PQ",
    "QUANTIZE_MODES",
    # data
    "Model",
    "Step",
    "Artifact",
    "Context",
    "Dataset",
    "TensorSpec",
    "MeasureSettings",
    "Measurement",
    "SampleModel",
    "Runtime",
    "ProgressCallback",
    "KVCacheLayout",
    "TokenDecoder",
    "SequenceRuntime",
    "TOKEN_INPUTS",
    "MIN_CONTEXT",
    "DECODE_ROOM",
    # errors
    "CompressorError",
    "UsageError",
    "UnsafeInputError",
    "InvalidInputError",
    "UnsupportedError",
    "CompressionError",
    "first_line",
    # helpers
    "import_factory",
    "native_output_silenced",
    "examples_from_data",
    "Examples",
    "Stopwatch",
    "time_calls",
    "peak_rss_bytes",
    "release_freed_memory",
    "release_mapped_file_pages",
    "cpu_info",
    "python_command",
    "child_environment",
    "run_in_fork",
    "run_python_child",
    "note_child_peak",
    "scratch_folder",
    "STATE_PREFIX",
    "detect_task",
    "declared_task",
    "label_output",
    "LabelOutput",
    "probe_rows",
    "GENERATION_OPTIONS",
]
