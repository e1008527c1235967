"""Hook implementations of the fasttext backend (stub)."""

from __future__ import annotations
