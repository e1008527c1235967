"""The Keras front end: Keras models (.keras, .h5, SavedModel) loaded safely, pruned
and trained with tfmot, and exported to other formats.

loading (with archives, hdf5)  checks and loads a file before TensorFlow runs its code
frameworks                     lazy TensorFlow, tf-keras and tfmot imports
training                       the Keras training loop every technique shares (``fit``)
pruning, qat                   tfmot magnitude pruning; quantization-aware training
structure, channels, distill   lowrank, channel pruning and students, rebuilt from the config
to_onnx                        export to ONNX with tf2onnx

Backends (tflite, onnx) call it; it imports no backend and not the PyTorch front end.
"""
