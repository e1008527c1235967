"""compressor backend: fasttext."""
