"""Lazy imports of TensorFlow, tf-keras and tensorflow-model-optimization.

tensorflow-model-optimization only accepts tf-keras (Keras 2) models, and
TensorFlow only routes ``tf.keras`` to tf-keras when ``TF_USE_LEGACY_KERAS`` is
set before its first import, so every TensorFlow import goes through here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def _prepare_environment() -> None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    # TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notices) is noise here.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Hide what C++ code writes to file descriptor 2 (absl start-up lines, converter
    progress) while the block runs; Python errors still arrive as exceptions."""
    from compressor.plugin import native_output_silenced

    with native_output_silenced(stdout=False):
        yield


@contextmanager
def private_tempdir() -> Iterator[None]:
    """Point :mod:`tempfile` at a scratch folder of this run, removed afterwards whatever happens.

    tf_keras extracts every member of a ``.keras`` with more than three into
    ``tempfile.mkdtemp()`` and removes it only when loading succeeds; autograph
    writes the code it generates into ``$TMPDIR`` and removes it only at exit.
    The folder is named like core's scratch folders, so a run killed meanwhile
    leaves nothing the next run does not remove.
    """
    from compressor.plugin import scratch_folder

    previous = tempfile.tempdir
    with scratch_folder() as folder:
        tempfile.tempdir = str(folder)
        try:
            yield
        finally:
            tempfile.tempdir = previous


def tensorflow() -> Any:
    _prepare_environment()
    with native_stderr_silenced():
        import tensorflow as tf

    return tf


def keras() -> Any:
    tensorflow()
    import tf_keras

    return tf_keras


def model_optimization() -> Any:
    tensorflow()
    import tensorflow_model_optimization as tfmot

    return tfmot
