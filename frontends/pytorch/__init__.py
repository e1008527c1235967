"""The PyTorch front end: PyTorch and Hugging Face models, loaded safely, exported,
and trained by the techniques that need torch (distillation, fine-tuning, qat, head
and channel pruning on modules, lowrank on modules).

The onnx, torch and tflite backends all hold a PyTorch model as a :class:`TorchModel`
(:mod:`~compressor_frontends.pytorch.model`). Modules:

* loading: ``loading`` (every format, ``safety`` and ``pt2`` checks first), ``hf``
  (transformers folders), ``text_data`` (text tokenized with the model's tokenizer),
  ``shapes`` (``--set input_shape``, example inputs);
* export: ``export`` (to ONNX), ``outputs`` (every output, named);
* techniques: ``techniques`` (the shared declarations), ``feeding``, ``matching``,
  ``distill``, ``finetune``, ``heads``, ``qat``, ``lowrank``; ``channels`` and
  ``onnx_graph`` (channel pruning decided on the model's ONNX export).

Importing the package (or ``model``, ``techniques``, ``loading``) imports no framework.
This front end imports no backend and no other front end.
"""

from compressor_frontends.pytorch.model import TorchModel

__all__ = ["TorchModel"]
