"""Hook implementations of the tflite backend (stub)."""

from __future__ import annotations
