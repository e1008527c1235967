"""compressor's front ends: what a model is *written in*.

A front end knows one framework (PyTorch, Keras): how to load a model safely,
export it to other formats, and the techniques that need the framework to train.
Backends (ONNX Runtime, LiteRT, torch, ...) use front ends; a front end imports
no backend and no other front end. See docs/architecture.md.
"""
