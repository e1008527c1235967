"""Example compressor backend: NumPy MLP weight archives."""
