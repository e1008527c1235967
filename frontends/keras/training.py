"""The Keras training loop every training-based technique of the Keras front end shares.

:func:`fit` trains a model (pruned, factorized, narrowed, fake-quantized or a
student) on ``--train-data``: the labels ``y`` train only the output they belong to
(``--set label_output=NAME``, else inferred:
:func:`compressor.training_labels.label_output`), every other output is matched to
the unedited model's predictions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from compressor.plugin import CompressionError, Dataset, LabelOutput, ProgressCallback, TensorSpec
from compressor_frontends.keras import frameworks


def fit(
    model: Any,
    reference: Any,
    params: Mapping[str, Any],
    inputs: Sequence[TensorSpec],
    train: Dataset,
    epochs: int,
    progress: ProgressCallback,
    message: str,
    callbacks: Sequence[Any] = (),
    teacher_weight: float = 0.0,
    choice: LabelOutput | None = None,
    reference_name: str = "the unedited model",
) -> str:
    """Train ``model`` on ``train`` for ``epochs`` (Adam at ``learning_rate``, ``batch_size``)
    (``model`` may wrap its layers): the output the labels ``y`` belong to (:func:`labels_for`)
    on them, with the loss that fits ``reference``'s output (plus ``teacher_weight`` times
    its match to ``reference``'s); every other output, and all without labels, matched to
    ``reference``'s (the unedited model's) predictions. ``choice``: :func:`labels_for`'s,
    when the caller has it. What the loss was, for the note."""
    keras = frameworks.keras()
    x = _features(inputs, train)
    targets = _predictions(reference, x)
    choice = choice if choice is not None else labels_for(reference, inputs, params, train)
    losses = [_scaled(float(np.var(target)) + 1e-6) for target in targets]
    described = f"every output matched to {reference_name}'s (MSE over its variance)"
    if choice.index is not None:
        index = choice.index
        labels = np.asarray(train.labels, dtype=np.float32).reshape(len(targets[index]), 1)
        losses[index] = _labelled(keras, reference, index, teacher_weight, float(np.var(targets[index])) + 1e-6)
        targets[index] = np.concatenate([targets[index].reshape(len(labels), -1), labels], axis=1)
        described = "cross-entropy on the labels" if len(targets) == 1 else (
            f"cross-entropy on the labels through {choice.name} ({choice.why}), the other outputs matched to "
            f"{reference_name}'s (MSE over their variance)")
    elif choice.note:
        described = choice.note
    elif len(targets) == 1:
        described = f"{reference_name}'s output matched (MSE over its variance)"
    model.compile(optimizer=keras.optimizers.Adam(float(params["learning_rate"])),
                  loss=losses if len(losses) > 1 else losses[0])
    report_epoch = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: progress(message, (epoch + 1) / epochs)
    )
    try:
        model.fit(
            x,
            targets if len(targets) > 1 else targets[0],
            batch_size=int(params["batch_size"]),
            epochs=epochs,
            callbacks=[*callbacks, report_epoch],
            verbose=0,
        )
    except (ValueError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CompressionError(f"fine-tuning failed: {first}") from None
    return described


def labels_for(reference: Any, inputs: Sequence[TensorSpec], params: Mapping[str, Any],
               train: Dataset) -> LabelOutput:
    """The output of ``reference`` the labels of ``train`` belong to
    (:func:`compressor.training_labels.label_output`, on its predictions for a few
    training examples); ``params["options"]``: the run's options (``label_output``,
    ``task.NAME``)."""
    from compressor.plugin import label_output, probe_rows

    rows = probe_rows(train.size)
    predictions = _predictions(reference, _features(inputs, train, rows))
    names = [str(name) for name in reference.output_names]
    return label_output(names, predictions, inputs, params.get("options") or {}, train, rows)


def _features(inputs: Sequence[TensorSpec], train: Dataset, rows: Any = None) -> Any:
    names = [spec.name for spec in inputs] or list(train.features)
    features = [train.features[name] if rows is None else np.asarray(train.features[name])[rows] for name in names]
    return features[0] if len(features) == 1 else features


def _predictions(reference: Any, x: Any) -> list[Any]:
    predicted = reference.predict(x, batch_size=256, verbose=0)
    return [np.asarray(array, dtype=np.float32) for array in
            (predicted if isinstance(predicted, (list, tuple)) else [predicted])]


def _scaled(variance: float) -> Any:
    """Mean squared error over the prediction's variance, so each output weighs about the
    same whatever its scale (a detector's boxes beside its scores)."""
    tf = frameworks.tensorflow()
    return lambda target, output: tf.reduce_mean(tf.square(target - output)) / variance


def _labelled(keras: Any, reference: Any, index: int, teacher_weight: float, variance: float) -> Any:
    """The loss of the labelled output ``index``, whose target is the reference's prediction
    with the label as a last column: (binary) cross-entropy on the label, from logits
    unless the output layer ends in a softmax (sigmoid), plus ``teacher_weight`` times
    the match to the prediction."""
    tf = frameworks.tensorflow()
    binary = reference.outputs[index].shape[-1] == 1
    from_logits = not _ends_in(keras, _output_layer(reference, index), "sigmoid" if binary else "softmax")

    def loss(target: Any, output: Any) -> Any:
        label, predicted = target[:, -1], target[:, :-1]
        output = tf.reshape(output, [tf.shape(output)[0], -1])
        if binary:
            hard = keras.losses.binary_crossentropy(label[:, None], output, from_logits=from_logits)
        else:
            hard = keras.losses.sparse_categorical_crossentropy(tf.cast(label, tf.int32), output,
                                                                from_logits=from_logits)
        if not teacher_weight:
            return hard
        soft = tf.reduce_mean(tf.square(predicted - output), axis=-1) / variance
        return teacher_weight * soft + (1 - teacher_weight) * hard

    return loss


def _output_layer(model: Any, index: int) -> Any:
    """The layer that gives ``model``'s output ``index``."""
    history = getattr(model.outputs[index], "_keras_history", None)
    layer = getattr(history, "layer", None)
    return layer if layer is not None else model.layers[-1]


def _ends_in(keras: Any, layer: Any, activation: str) -> bool:
    if isinstance(layer, keras.layers.Softmax):
        return activation == "softmax"
    function = getattr(layer, "activation", None)
    return function is not None and getattr(function, "__name__", "") == activation
