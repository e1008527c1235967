"""The PyTorch front end: PyTorch and Hugging Face models, loaded safely, exported,
and trained by the techniques that need torch (distillation, fine-tuning, qat, head
and channel pruning on modules, lowrank on modules)."""
