"""Hook implementations of the onnx backend (stub)."""

from __future__ import annotations
