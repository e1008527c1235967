"""compressor backend: tflite."""
