"""compressor's torch backend: PyTorch models compressed with PyTorch's own tools and run by PyTorch."""

import logging

# torchao warns on import that its CUDA kernels (mxfp8, cutlass) do not load into a
# CPU-only torch, and transformers imports torchao whenever it is installed: in every
# compressor process (this module is loaded with the plugins) those lines are noise.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
