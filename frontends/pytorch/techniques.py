"""The techniques of the PyTorch front end as backends declare them: one vocabulary for
``prune``, ``lowrank``, ``distill`` and ``qat`` on the onnx and torch backends, the
text-data options, and what ``distill`` and ``prune structure=head`` refuse before
training. Importing this module imports no framework."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compressor.plugin import EVERY_STEP, Context, Param, Step, Technique, UsageError

#: ``unstructured``: single weights; ``channel``: whole outputs; ``head``: attention heads
#: of transformers models, on the torch model (:mod:`compressor_frontends.pytorch.heads`).
STRUCTURES = ("unstructured", "channel", "head")


class Structure(str):
    """The type of ``prune structure=``: any case and spacing of a name in STRUCTURES."""

    def __new__(cls, value: object) -> str:  # type: ignore[misc]
        return str(value).strip().lower()


#: Fine-tuning after prune and lowrank, on the torch model, when --train-data is given.
FINE_TUNING_PARAMS = {
    "epochs": Param(int, 2, "fine-tuning epochs on --train-data (0: one-shot)", minimum=0),
    "batch_size": Param(int, 32, "fine-tuning batch size", minimum=1),
    "learning_rate": Param(float, None, "fine-tuning AdamW learning rate (default 1e-3, transformers 5e-5)",
                           minimum=1e-8, maximum=1),
}
LOWRANK_PARAMS = {
    "rank": Param(int, None, "rank kept in every factorized layer (or energy=)", minimum=1),
    "energy": Param(float, None, "share of squared singular values kept, 0.01-1 (or rank=)", minimum=0.01, maximum=1),
    "layers": Param(str, "", "comma-separated fnmatch patterns of node or weight names (default: all)"),
    "min_size": Param(int, 4096, "leave weights with fewer elements alone", minimum=0),
    **FINE_TUNING_PARAMS,
}
DISTILL_PARAMS = {
    "student": Param(str, None, "package.module:function returning the student nn.Module (or layers=)"),
    "layers": Param(int, None, "transformers teacher: a student of this many of its layers (or student=)",
                    minimum=1),
    "epochs": Param(int, 3, "passes over --train-data", minimum=1),
    "temperature": Param(float, 2.0, "softening of teacher and student logits", minimum=0.05, maximum=100),
    "alpha": Param(float, 0.5, "weight of the teacher loss; the rest: cross-entropy on labels y, when "
                   "the train data has them", minimum=0, maximum=1),
    "batch_size": Param(int, 32, "training batch size", minimum=1),
    "learning_rate": Param(float, None, "AdamW learning rate (default 1e-3 with student=, 1e-4 with layers=)",
                           minimum=1e-8, maximum=1),
}
PRUNE_PARAMS = {
    "sparsity": Param(float, None, "share of weights set to zero (channel: of outputs, head: of heads removed)",
                      minimum=0, maximum=0.99, required=True),
    "structure": Param(Structure, "unstructured", "unstructured: single weights; channel: whole outputs; "
                       "head: attention heads", choices=STRUCTURES),
    **FINE_TUNING_PARAMS,
}
QAT_PARAMS = {
    "epochs": Param(int, 2, "training epochs with fake-quantized weights and activations", minimum=1),
    "batch_size": Param(int, 32, "training batch size", minimum=1),
    "learning_rate": Param(float, 1e-4, "AdamW learning rate", minimum=1e-8, maximum=1),
}
DISTILL = Technique(
    "distill",
    help="train a smaller student (a factory's, or a transformers teacher's layers) to match the teacher on "
         "--train-data",
    params=DISTILL_PARAMS,
    requires_data={EVERY_STEP: "train"},
)


def lowrank_technique(what: str) -> Technique:
    """``lowrank`` as the onnx and torch backends declare it; ``what`` says what it factorizes."""
    return Technique("lowrank", help=f"{what}; fine-tuned on --train-data", params=LOWRANK_PARAMS,
                     candidates=("lowrank energy=0.99", "lowrank energy=0.95", "lowrank energy=0.9"))


def text_options() -> dict[str, Param]:
    """``--set max_length=`` and ``--set tokenizer=`` of text data (:mod:`compressor_frontends.pytorch.text_data`)."""
    from compressor_frontends.pytorch.text_data import TEXT_OPTIONS_HELP

    return {"max_length": Param(int, None, TEXT_OPTIONS_HELP["max_length"], minimum=1),
            "tokenizer": Param(str, None, TEXT_OPTIONS_HELP["tokenizer"])}


def require_transformers(step: Step, module: Any, source: Path) -> None:
    """Refuse head pruning, or ``distill layers=``, of a plain torch ``module`` (``source`` names it)."""
    from compressor_frontends.pytorch.feeding import is_transformers

    if module is None or is_transformers(module):
        return
    if step.technique == "distill":
        raise UsageError(f"'{step}': layers= needs a transformers teacher; {source.name} is a plain "
                         "torch model (give student=package.module:function)")
    raise UsageError(f"'{step}' needs a transformers model (attention heads); {source.name} is a plain torch model")


def check_torch_step(step: Step, module: Any, context: Context, source: Path | None = None) -> None:
    """What ``distill`` and ``prune structure=head`` refuse before training (the onnx and torch
    backends' steps): head ranking without data, distill's student/layers, layers= too many,
    and (``source`` given) either of them on a plain torch model."""
    from compressor_frontends.pytorch.feeding import data_for

    if step.params.get("structure") == "head" and data_for(context, "calibration", "eval", "train") is None:
        raise UsageError(f"'{step}' ranks heads on data: pass --data or --calibration-data")
    if source is not None and (step.technique != "distill" or "layers" in step.params):
        require_transformers(step, module, source)
    if step.technique != "distill":
        return
    layers = step.params.get("layers")
    if (step.params.get("student") is None) == (layers is None):
        raise UsageError("distill needs exactly one of student=package.module:function or layers=N")
    total = getattr(getattr(module, "config", None), "num_hidden_layers", None)
    if layers is not None and isinstance(total, int) and total > 0 and int(layers) >= total:
        raise UsageError(f"'{step}': the teacher has {total} layers; layers= must be fewer")
