"""Imported by ``compressor backends --check`` (one of the backend's ``runtime_imports``):
fails when the importable ``fasttext`` is a predict-only module such as fasttext-predict's,
which package metadata cannot show when it shadows fastText from another folder on the
path (:func:`compressor_fasttext.loading.fasttext_module` says why and how to fix it).
Nothing else imports it."""

from __future__ import annotations

from compressor_fasttext.loading import fasttext_module

fasttext_module()
