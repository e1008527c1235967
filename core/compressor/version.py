"""compressor's version (``compressor.__version__``), in a module of its own so that core's
modules can name it without importing the package's ``__init__``."""

from __future__ import annotations

__version__ = "0.1.0"
