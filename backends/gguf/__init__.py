"""compressor's ``gguf`` backend: Hugging Face causal LMs converted to GGUF, quantized and run
by llama.cpp (llama-cpp-python). The hooks are in :mod:`compressor_gguf.plugin`; importing the
package imports no framework."""
