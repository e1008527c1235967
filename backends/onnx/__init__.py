"""compressor's onnx backend: PyTorch and ONNX models to (quantized) ONNX, run by ONNX Runtime."""

import os

# ONNX Runtime's telemetry writes a session file (.ses) into $TMPDIR on import and
# would report usage; compressor leaves nothing behind and sends nothing.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
