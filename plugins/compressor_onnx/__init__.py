"""compressor backend: onnx."""
