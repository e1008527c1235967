"""Fine-tuning of an edited torch model against the unedited one, on ``--train-data``.

After ``prune`` (unstructured, ``structure=channel``, ``structure=head``) and
``lowrank`` the edited model is trained to match the unedited model with distill's
loss (:mod:`compressor_frontends.pytorch.matching`: KL on softened logits, plus
cross-entropy on the labels ``y`` through the output they belong to; hidden-state
matching for encoders; other outputs by MSE over their variance); pruned weights are
masked again after every optimizer step.

An edit decided on the model's ONNX export names weights of the graph: each is found
in the torch model by value (:func:`locate_parameters`: an exported Linear/Conv weight
is the parameter itself, or its transpose for a MatMul), after folding each BatchNorm
into the Conv before it as the exporter does (:func:`folded_batch_norms`) where needed.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

from compressor.plugin import Context, Step
from compressor_frontends.pytorch.model import TorchModel, set_mode

PLAIN_RATE, TRANSFORMERS_RATE = 1e-3, 5e-5
LOSS_SETTINGS = {"temperature": 2.0, "alpha": 0.5}


def fine_tuning_wanted(step: Step, context: Context) -> bool:
    return context.train_data is not None and int(step.params.get("epochs") or 0) > 0


def one_shot_note(step: Step, context: Context) -> str:
    if context.train_data is None:
        return "one-shot, no fine-tuning (no --train-data)"
    return "one-shot, no fine-tuning (epochs=0)"


def train_student(model: TorchModel, teacher: Any, student: Any, step: Step, context: Context,
                  after_step: Callable[[], None] | None = None) -> tuple[list[str], dict[str, Any]]:
    """Train ``student`` (the edited model) to match ``teacher`` (the unedited one) on the
    train data, in place: the note and metadata."""
    import torch

    from compressor_frontends.pytorch.distill import train
    from compressor_frontends.pytorch.feeding import is_transformers
    from compressor_frontends.pytorch.matching import matching

    dataset = context.train_data
    assert dataset is not None
    set_mode(teacher, False)
    plan = matching(model, teacher, student, dataset, context, step)
    rate = float(step.params.get("learning_rate") or (TRANSFORMERS_RATE if is_transformers(teacher) else PLAIN_RATE))
    settings = {"epochs": int(step.params["epochs"]), "batch_size": int(step.params.get("batch_size") or 32),
                **LOSS_SETTINGS}
    started = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(context.seed)
        losses = train(model, teacher, student, dataset, settings, plan, rate, context, after_step,
                       stage="fine-tuning")
    set_mode(student, False)
    loss = plan.describe()
    note = (f"fine-tuned {settings['epochs']} epoch(s) on {dataset.size} examples of {dataset.path.name} "
            f"against the unedited model ({loss}); loss {losses[0]:.4g} -> {losses[-1]:.4g}")
    return [note, plan.labels.note] if plan.labels.note else [note], {"fine_tuning": {
        "epochs": settings["epochs"], "examples": dataset.size, "loss": loss, "label_output": plan.labels.name,
        "learning_rate": rate, "epoch_losses": [round(value, 6) for value in losses],
        "seconds": round(time.perf_counter() - started, 3),
    }}


def _key(array: Any) -> tuple[tuple[int, ...], str, bytes]:
    import hashlib

    import numpy as np

    contiguous = np.ascontiguousarray(array)
    return tuple(contiguous.shape), contiguous.dtype.str, hashlib.blake2b(contiguous.tobytes(), digest_size=16).digest()


def locate_parameters(module: Any, arrays: dict[str, Any], close: bool = False) -> dict[str, tuple[str, bool]]:
    """Initializer name -> (parameter name, whether the initializer is its transpose),
    for the arrays equal (``close``: within float rounding) to exactly one parameter of ``module``."""
    if close:
        return _locate_close(module, arrays)
    found: dict[Any, list[tuple[str, bool]]] = {}
    for name, parameter in module.named_parameters():
        values = parameter.detach().cpu().numpy()
        found.setdefault(_key(values), []).append((name, False))
        if values.ndim == 2:
            found.setdefault(_key(values.T), []).append((name, True))
    located = {}
    for name, array in arrays.items():
        matches = found.get(_key(array), [])
        if len(matches) == 1:
            located[name] = matches[0]
    return located


def _locate_close(module: Any, arrays: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    import numpy as np

    candidates = []
    for name, parameter in module.named_parameters():
        values = parameter.detach().cpu().numpy()
        candidates.append((name, False, values))
        if values.ndim == 2:
            candidates.append((name, True, values.T))
    located = {}
    for name, array in arrays.items():
        scale = float(np.abs(array).max()) if array.size else 0.0
        matches = [(parameter, transposed) for parameter, transposed, values in candidates
                   if values.shape == array.shape and np.allclose(values, array, rtol=1e-4, atol=1e-6 * scale)]
        if len(matches) == 1:
            located[name] = matches[0]
    return located


def folded_batch_norms(model: TorchModel, module: Any, context: Context) -> tuple[Any, int]:
    """``module`` with each BatchNorm registered right after a Conv of the same width
    folded into it, as the ONNX exporter does, and the count; ``module`` as it was (and
    0) when there are none or the folded model does not compute the same outputs (the
    modules were registered in another order than they run)."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from compressor_frontends.pytorch.feeding import batches, call, data_for

    folded_module, folded = set_mode(copy.deepcopy(module), False), 0
    for parent in list(folded_module.modules()):
        children = list(parent.named_children())
        for (name, layer), (norm_name, norm) in zip(children, children[1:]):
            if (isinstance(layer, torch.nn.modules.conv._ConvNd) and not layer.transposed
                    and isinstance(norm, torch.nn.modules.batchnorm._BatchNorm) and norm.running_mean is not None
                    and norm.num_features == layer.out_channels):
                setattr(parent, name, fuse_conv_bn_eval(layer, norm))
                setattr(parent, norm_name, torch.nn.Identity())
                folded += 1
    dataset = data_for(context, "train", "calibration", "eval")
    if not folded or dataset is None:
        return module, 0
    batch, _ = next(batches(model, dataset, min(8, dataset.size)))
    with torch.no_grad():
        _, expected = call(model, set_mode(module, False), batch)
        _, got = call(model, folded_module, batch)
    scale = float(expected.abs().max()) or 1.0
    if not torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * scale):
        return module, 0
    return folded_module, folded


def parameter_masks(module: Any, keeps: dict[tuple[str, bool], Any]) -> list[tuple[Any, Any]]:
    """(parameter, float mask in its layout) for every located keep mask."""
    import numpy as np
    import torch

    parameters = dict(module.named_parameters())
    masks = []
    for (name, transposed), keep in keeps.items():
        parameter = parameters[name]
        layout = np.ascontiguousarray(keep.T if transposed else keep)
        masks.append((parameter, torch.from_numpy(layout).to(parameter.dtype)))
    return masks
