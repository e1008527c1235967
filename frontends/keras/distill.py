"""``distill`` on Keras models: a smaller student trained to match the teacher's outputs.

The student is a user's factory's (``student=package.module:function``) or derived
from the teacher (``width=W``: every Dense, convolution and recurrent layer that is
not an output gets W of its units or filters, and fresh weights). It is trained on
``--train-data`` with the response-based loss of Hinton et al.: ``alpha`` times the
KL divergence between the teacher's and the student's outputs softened by
``temperature`` (times T^2, so its gradients keep their scale), plus ``1 - alpha``
times the cross-entropy on the labels ``y`` where the data has them and they are the
output's classes (:func:`compressor.training_labels.label_output`); without labels
the student only matches the teacher. The teacher is a fixed function of the training
examples, so its logits are computed once, up front. A teacher with several outputs
has each matched to the teacher's by MSE over its variance (``training.fit``), and the
labels train only the output they belong to (``alpha`` x that match + ``1 - alpha`` x
cross-entropy).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from compressor.plugin import (
    CompressionError,
    CompressorError,
    Dataset,
    ProgressCallback,
    TensorSpec,
    UsageError,
    import_factory,
)
from compressor_frontends.keras import frameworks
from compressor_frontends.keras.structure import LayerGraph, Restructured
from compressor_frontends.keras.training import fit, labels_for

DEFAULT_WIDTH = 0.5
#: Layers whose width (``units`` or ``filters``) a derived student scales.
SCALED = {"Dense": "units", "Conv1D": "filters", "Conv2D": "filters", "Conv3D": "filters",
          "SeparableConv1D": "filters", "SeparableConv2D": "filters", "Conv2DTranspose": "filters",
          "LSTM": "units", "GRU": "units", "SimpleRNN": "units"}


class StudentFactory(str):
    """The type of ``distill student=``: ``package.module:function``, imported while the
    request is checked so a wrong name stops it before any work."""

    def __new__(cls, value: object) -> str:  # type: ignore[misc]
        text = str(value).strip()
        # A factory module importing TensorFlow must get tf-keras, as the front end does.
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
        import_factory(text, "student")
        return super().__new__(cls, text)


class Width(float):
    """The type of ``distill width=``: a share strictly between 0 and 1."""

    def __new__(cls, value: object) -> float:  # type: ignore[misc]
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, bool) or not 0 < number < 1:
            raise UsageError(f"width={value!r} must be a number between 0 and 1, both excluded "
                             "(the share of each layer's units the student keeps)")
        return super().__new__(cls, number)


def distill(teacher: Any, params: Mapping[str, Any], inputs: Sequence[TensorSpec], train: Dataset,
            seed: int, progress: ProgressCallback) -> Restructured:
    factory, width = params.get("student"), params.get("width")
    if factory is not None and width is not None:
        raise UsageError("distill takes student=package.module:function or width=W, not both")
    keras = frameworks.keras()
    keras.utils.set_random_seed(seed)
    if factory is not None:
        student, described = _from_factory(keras, str(factory), teacher), f"student {factory}"
    else:
        width = float(width) if width is not None else DEFAULT_WIDTH
        student, described = derived_student(teacher, width), f"width={width:g}"
    epochs, temperature, alpha = int(params["epochs"]), float(params["temperature"]), float(params["alpha"])
    several = len(teacher.outputs) > 1
    choice = labels_for(teacher, inputs, params, train)
    labelled = choice.index is not None
    if several:
        how = fit(student, teacher, params, inputs, train, epochs, progress, "distilling the student",
                  teacher_weight=alpha, choice=choice, reference_name="the teacher")
    else:
        match(student, teacher, params, inputs, train, epochs, temperature, alpha, progress,
              "distilling the student", labelled)
    before, after = teacher.count_params(), student.count_params()
    if several:
        loss = f"{len(teacher.outputs)} outputs, {how}"
        if labelled:
            loss += f" (there {alpha:g} x the teacher's prediction + {1 - alpha:g} x cross-entropy)"
    elif labelled:
        loss = f"{alpha:g} x soft loss (T={temperature:g}) + {1 - alpha:g} x label cross-entropy"
    elif train.labels is not None:
        loss = f"soft loss only (T={temperature:g}; {choice.note})"
    else:
        loss = f"soft loss only (T={temperature:g}; {train.path.name} has no labels y)"
    note = (f"distilled into {described}: parameters {before:,} -> {after:,}, {epochs} epoch(s) on "
            f"{train.path.name}, {loss}")
    metadata = {"student": str(factory) if factory is not None else f"width={width:g}",
                "parameters_teacher": before, "parameters_student": after, "epochs": epochs,
                "temperature": temperature, "alpha": alpha if labelled else 1.0, "labels": labelled}
    return Restructured(student, note, {"distillation": metadata})


def _from_factory(keras: Any, name: str, teacher: Any) -> Any:
    factory = import_factory(name, "student")
    try:
        student = factory()
    except CompressorError:
        raise
    except Exception as error:  # noqa: BLE001 - the factory is the user's code
        raise UsageError(f"student {name!r} failed: {type(error).__name__}: {str(error)[:200]}") from None
    if not isinstance(student, keras.Model):
        raise UsageError(f"student {name!r} returned {type(student).__name__}, not a tf-keras Model "
                         "(build it with tf_keras, or tf.keras with TF_USE_LEGACY_KERAS=1)")
    if not student.built or not student.inputs:
        raise CompressionError(f"the student from {name} has no input shapes: give its Input layers")
    shapes = {"inputs": ([_shape(t) for t in teacher.inputs], [_shape(t) for t in student.inputs]),
              "outputs": ([_shape(t) for t in teacher.outputs], [_shape(t) for t in student.outputs])}
    for what, (wanted, found) in shapes.items():
        if wanted != found:
            raise CompressionError(f"the student from {name} has {what} {found}; the teacher's are {wanted}")
    return student


def _shape(tensor: Any) -> list[int | None]:
    return list(tensor.shape[1:])


def derived_student(teacher: Any, width: float) -> Any:
    """The teacher's architecture with ``width`` of every inner layer's units or filters, fresh weights."""
    keras = frameworks.keras()
    graph = LayerGraph(teacher)
    heads = _heads(graph)
    narrowed = 0
    for entry in graph.config["layers"]:
        key = SCALED.get(entry["class_name"])
        config = entry["config"]
        if key is None or entry["name"] in heads or int(config.get("groups", 1)) != 1:
            continue
        config[key] = max(1, int(round(int(config[key]) * width)))
        narrowed += 1
    if not narrowed:
        raise CompressionError("width= found no Dense, convolution or recurrent layer to narrow besides the "
                               "outputs; give student=package.module:function")
    for entry in graph.config["layers"]:
        entry.pop("build_config", None)
    graph.config["name"] = f"{graph.name}_student"
    try:
        student = keras.Model.from_config(graph.config)
    except (ValueError, TypeError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CompressionError(f"cannot narrow this model by width (e.g. a residual connection needs equal "
                               f"widths): {first[:200]}; give student=package.module:function") from None
    wanted, found = [_shape(t) for t in teacher.outputs], [_shape(t) for t in student.outputs]
    if wanted != found:
        raise CompressionError(f"narrowing by width changed the outputs from {wanted} to {found}; "
                               "give student=package.module:function")
    return student


def _heads(graph: LayerGraph) -> set[str]:
    """The layers that set the width of an output: the output layer, or the last Dense,
    convolution or recurrent layer before it through layers with one input (a Softmax)."""
    heads = set()
    for name in graph.outputs:
        current, seen = name, set()
        while graph.entries[current]["class_name"] not in SCALED and current not in seen:
            seen.add(current)
            sources = graph.inputs(current)
            if len(sources) != 1:
                break
            current = sources[0]
        heads.add(current)
    return heads


def match(student: Any, teacher: Any, params: Mapping[str, Any], inputs: Sequence[TensorSpec], train: Dataset,
          epochs: int, temperature: float, alpha: float, progress: ProgressCallback, message: str,
          labelled: bool = True) -> None:
    """Train ``student`` on ``train`` (Adam at ``learning_rate``, ``batch_size``) to match
    ``teacher``'s softened outputs, and the labels with weight ``1 - alpha`` where there are
    any and ``labelled`` says they are the output's classes.

    Both are compared as logits: a final softmax or sigmoid is left out (a teacher's
    probabilities near 0 or 1 would lose the small differences distillation learns from)."""
    import numpy as np

    keras = frameworks.keras()
    tf = frameworks.tensorflow()
    for model in (teacher, student):
        if len(model.outputs) != 1:
            raise CompressionError("distillation supports single-output classifiers only")
    names = [spec.name for spec in inputs] or list(train.features)
    features = [np.asarray(train.features[name], dtype=np.float32) for name in names]
    x = features[0] if len(features) == 1 else features
    teacher_view, _, teacher_kind = logits_view(keras, teacher)
    raw = np.asarray(teacher_view.predict(x, batch_size=256, verbose=0), dtype=np.float32)
    teacher_logits = _to_logits(np, raw.reshape(len(raw), -1), teacher_kind)
    use_labels = labelled and train.labels is not None
    labels = (np.asarray(train.labels, dtype=np.float32).reshape(len(teacher_logits), -1)[:, :1]
              if use_labels else np.full((len(teacher_logits), 1), -1, np.float32))
    hard = 0.0 if not use_labels else 1.0 - alpha
    soft = 1.0 - hard
    trained, twin, student_kind = logits_view(keras, student)
    binary = teacher_logits.shape[1] == 1

    def loss(target: Any, output: Any) -> Any:
        teacher_z, label = target[:, :-1], target[:, -1]
        student_z = _to_logits(tf.math, tf.reshape(output, [tf.shape(output)[0], -1]), student_kind)
        if binary:
            teacher_z = tf.concat([tf.zeros_like(teacher_z), teacher_z], axis=1)
            student_z = tf.concat([tf.zeros_like(student_z), student_z], axis=1)
        p_teacher = tf.nn.softmax(teacher_z / temperature)
        log_student = tf.nn.log_softmax(student_z / temperature)
        kl = tf.reduce_sum(p_teacher * (tf.math.log(p_teacher + 1e-12) - log_student), axis=1)
        total = soft * temperature**2 * kl
        if hard:
            classes = tf.cast(label, tf.int32)
            total += hard * tf.nn.sparse_softmax_cross_entropy_with_logits(labels=classes, logits=student_z)
        return total

    trained.compile(optimizer=keras.optimizers.Adam(float(params["learning_rate"])), loss=loss)
    report = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: progress(message, (epoch + 1) / epochs))
    try:
        trained.fit(x, np.concatenate([teacher_logits, labels], axis=1), batch_size=int(params["batch_size"]),
                    epochs=epochs, callbacks=[report], verbose=0)
    except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CompressionError(f"distillation failed: {first[:300]}") from None
    if twin is not None:
        student.layers[-1].set_weights(twin.get_weights())


def logits_view(keras: Any, model: Any) -> tuple[Any, Any | None, str]:
    """A model sharing ``model``'s layers that outputs logits where it can; the twin of the
    last layer whose trained weights go back into it (or None); and what the view outputs:
    ``linear`` (logits), or ``softmax``/``sigmoid`` probabilities where it cannot."""
    last = model.layers[-1]
    inner = getattr(last, "layer", last)  # tfmot's QuantizeWrapper
    activation = _activation(keras, inner)
    if activation == "linear" or last is not inner or len(last.inbound_nodes) != 1:
        return model, None, activation
    if isinstance(last, (keras.layers.Softmax, keras.layers.Activation)):
        return keras.Model(model.inputs, last.input), None, "linear"
    try:
        twin = type(last).from_config({**last.get_config(), "activation": "linear", "name": f"{last.name}_logits"})
        view = keras.Model(model.inputs, twin(last.input))
        twin.set_weights(last.get_weights())
    except (ValueError, TypeError, KeyError, NotImplementedError):
        return model, None, activation
    return view, twin, "linear"


def _activation(keras: Any, layer: Any) -> str:
    """``softmax``, ``sigmoid`` or ``linear``: what a layer applies last."""
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    name = getattr(getattr(layer, "activation", None), "__name__", "linear")
    return name if name in ("softmax", "sigmoid") else "linear"


def _to_logits(math: Any, values: Any, kind: str) -> Any:
    """Logits from probabilities (``math``: numpy or ``tf.math``): log-probabilities after a
    softmax, log-odds after a sigmoid; ``linear`` values are logits already."""
    if kind == "softmax":
        return math.log(math.maximum(values, 1e-7))
    if kind == "sigmoid":
        clipped = math.minimum(math.maximum(values, 1e-7), 1 - 1e-7)
        return math.log(clipped) - math.log1p(-clipped)
    return values
