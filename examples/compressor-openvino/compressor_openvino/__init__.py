"""An OpenVINO backend for compressor, written only against ``compressor.plugin``."""
