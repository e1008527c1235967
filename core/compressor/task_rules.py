"""How :mod:`compressor.tasks` tells what an output is: from its shape, its values and
the model's other outputs (see the table in :mod:`compressor.tasks`).

A decision is an :class:`OutputTask`: the task, the evidence in words, and the
parameters the comparison needs (a channel axis, a threshold, a CTC blank, an
anchor head's layout). Axes in parameters are axes of the stacked array, batch first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from compressor.errors import UsageError
from compressor.models import TensorSpec
from compressor.specs import TASKS
from compressor.task_evidence import Look, anchor_head, box_form, dominant_class, look

BOX_NAMES = re.compile(r"box|bbox|loc|regress|landm|coord|delta|offset|keypoint|kpt|point", re.I)
EMBEDDING_NAMES = re.compile(r"embed|pooler|sentence|feature|vector", re.I)
GENERIC_NAME = re.compile(r"(output|out|y|result)?[_:.]?\d*", re.I)
STATE_NAMES = re.compile(r"(?<!hidden_)(?<!last_)state|^[hc]_?n$|cache|^present|past_key", re.I)
SCORE_NAMES = re.compile(r"score|conf|prob|cls|class|logit", re.I)
#: A class winning at least this share of a sequence's positions is a CTC blank...
CTC_BLANK_SHARE = 0.3
#: ...among at least this many classes (fewer are coordinates or yes/no per frame, not an alphabet).
MIN_CTC_CLASSES = 5
#: Maps whose smallest end axis is larger than this have no channel axis.
MAX_CHANNELS = 64
#: Detection defaults: a detection's least score and the IoU above which NMS drops the weaker box.
SCORE_THRESHOLD, NMS_IOU = 0.25, 0.45


@dataclass(frozen=True)
class OutputTask:
    task: str
    reason: str
    params: dict[str, Any] = field(default_factory=dict)

    def info(self, values: Any) -> dict[str, Any]:
        """``{"task", "reason", "shape"}`` for the report, plus ``params`` when there are any."""
        entry: dict[str, Any] = {"task": self.task, "reason": self.reason, "shape": list(values.shape[1:])}
        if self.params:
            entry["params"] = dict(self.params)
        return entry


@dataclass(frozen=True)
class Neighbours:
    """What the model's other outputs are, where it decides what one output is."""

    #: An output holding class probabilities, one row per example (softmax ``[N, K]``), and K.
    classifier: str | None = None
    classes: int = 0
    #: Spatial shape -> an output holding class probabilities per pixel there.
    probability_maps: Mapping[tuple[int, ...], str] = field(default_factory=dict)


def chosen_task(name: str, options: Mapping[str, Any]) -> str | None:
    """The task declared for output ``name`` (``task.NAME=``, else ``task=``), None when
    none is (or ``task=generate``, the whole model's); refuses one that is not in
    :data:`compressor.specs.TASKS`."""
    task = options.get(f"task.{name}") or options.get("task")
    if task == "generate" and not options.get(f"task.{name}"):
        return None  # the model's task: its outputs' are inferred
    if task is not None and task not in TASKS:
        raise UsageError(f"task {task!r} is not one of: {', '.join(TASKS)}")
    return task


def decide_all(specs: Sequence[TensorSpec], values: Mapping[str, Any], inputs: Sequence[TensorSpec],
               options: Mapping[str, Any], positions: Mapping[str, int]) -> dict[str, OutputTask]:
    """A decision for every output in ``values`` (name -> values of every example)."""
    floats = {spec.name: values[spec.name] for spec in specs
              if spec.name in values and values[spec.name].dtype.kind in "fc"}
    looks = {name: look(array) for name, array in floats.items()}
    pairs = box_score_pairs(specs, floats, looks, options)
    decided: dict[str, OutputTask] = {}
    for spec in specs:
        if spec.name not in values:
            continue
        if spec.name in pairs:
            decided[spec.name] = _pair_boxes(spec.name, pairs[spec.name], floats, looks, options)
        elif spec.name in pairs.values():
            boxes = next(name for name, scores in pairs.items() if scores == spec.name)
            decided[spec.name] = OutputTask("detection", f"{looks[spec.name].shown}: scores over the anchors of "
                                            f"{boxes!r}, compared with its boxes",
                                            {"layout": "pair-scores", "boxes": boxes})
        else:
            others = _neighbours({name: item for name, item in looks.items() if name != spec.name})
            decided[spec.name] = decide_one(spec, values[spec.name], inputs, options,
                                            positions.get(spec.name, 0), others, looks.get(spec.name))
    return decided


def decide_one(spec: TensorSpec, values: Any, inputs: Sequence[TensorSpec], options: Mapping[str, Any],
               position: int = 0, neighbours: Neighbours | None = None, look_: Look | None = None) -> OutputTask:
    """What one output is, from its values (batch axis first), the model's inputs,
    ``--set`` options and what the other outputs are."""
    shape = tuple(values.shape[1:])
    declared = chosen_task(spec.name, options)
    if values.dtype.kind not in "fc":
        kind = "string" if values.dtype.kind in "USO" else "integer"
        if math.prod(shape) <= 1:
            return OutputTask("classifier", f"{kind} labels, one per example: compared as a classifier's top-1")
        return OutputTask("classifier", f"{kind} output of {list(shape)} per example: compared as labels")
    look_ = look_ or look(values)
    if declared is not None:
        return _declared(declared, spec.name, values, look_, options)
    return _inferred(spec.name, values, look_, {item.name for item in inputs}, options, position,
                     neighbours or Neighbours())


def _inferred(name: str, values: Any, look_: Look, input_names: set[str], options: Mapping[str, Any],
              position: int, neighbours: Neighbours) -> OutputTask:
    shape, shown = look_.shape, look_.shown
    if STATE_NAMES.search(name):
        return OutputTask("state", f"named {name!r}: a recurrent state, compared as numbers")
    if len(shape) >= 2:
        last = shape[-1]
        if "input_ids" in input_names and (last >= 1000 or "logit" in name.lower()):
            return OutputTask("language-model", f"{shown} logits over a vocabulary of {last} with input_ids")
        if BOX_NAMES.search(name):
            return OutputTask("regression", f"named {name!r}: coordinates")
        positions = len(shape) == 2 or (len(shape) == 3 and shape[1] == 1)
        recognised = _ctc(values, look_, options) if positions and "input_ids" not in input_names else None
        if recognised is not None:  # a speech recogniser takes an attention_mask too
            return recognised
        if "attention_mask" in input_names:
            return OutputTask("embedding", "token vectors with an attention_mask: mean-pooled into one "
                              "vector per example")
        numbers_axis = anchor_head(values, look_)
        if numbers_axis is not None:
            return _anchor_head(look_, numbers_axis, options, "an anchor head: box centre and size in "
                                "pixels, then class scores in [0, 1]")
        if positions:
            return _positions(values, look_)
        return _map(look_, neighbours)
    columns = shape[0] if shape else 1
    if columns == 1:
        return _one_number(look_)
    if BOX_NAMES.search(name):
        return OutputTask("regression", f"named {name!r}: coordinates")
    if EMBEDDING_NAMES.search(name):
        return OutputTask("embedding", f"named {name!r}: one vector per example")
    if 1 in look_.softmax_axes:
        return OutputTask("classifier", f"[N, {columns}]: scores per class, top-1 compared")
    if neighbours.classifier is not None and (SCORE_NAMES.search(name) or columns == neighbours.classes):
        return OutputTask("classifier", f"[N, {columns}]: scores per class (beside {neighbours.classifier!r}, "
                          "its probabilities), top-1 compared")
    if neighbours.classifier is not None:
        return OutputTask("regression", f"{shown} beside {neighbours.classifier!r}, which holds the class "
                          f"probabilities ({look_.range_text()}): boxes or landmarks, compared as numbers")
    if look_.unit_norm:
        return OutputTask("embedding", f"{shown}: vectors of length 1, an embedding")
    if look_.probabilities:
        return OutputTask("multi-label", f"{shown}: {look_.range_text()} that do not sum to 1: independent "
                          "probabilities (multi-label), each decided at 0.5", {"threshold": 0.5})
    if position > 0 and GENERIC_NAME.fullmatch(name):
        return OutputTask("regression", f"[N, {columns}] after the first output, with no name to say what it "
                          "is (boxes, landmarks?): compared as numbers")
    return OutputTask("classifier", f"[N, {columns}]: scores per class, top-1 compared")


def _one_number(look_: Look) -> OutputTask:
    if look_.probabilities:
        return OutputTask("probability", f"{look_.shown}: one value in [0, 1] per example: a probability, "
                          "decided at 0.5", {"threshold": 0.5})
    return OutputTask("regression", f"{look_.shown}: numbers, compared by relative error")


def _class_axis(look_: Look, candidates: Sequence[int]) -> tuple[int, str]:
    """The class axis among ``candidates`` (preferred first) and how its scores look."""
    for axis in candidates:
        if axis in look_.softmax_axes:
            return axis, "probabilities"
        if axis in look_.log_softmax_axes:
            return axis, "log-probabilities"
    return candidates[0], "scores"


def _position_axes(look_: Look) -> tuple[tuple[int, int], int, str]:
    """``[N, T, C]`` (or ``[N, T, 1, C]``: a ``[T, N, C]`` output run one example at a time):
    its two axes, the class axis and how its scores look."""
    axes = (1, 2) if len(look_.shape) == 2 else (1, 3)
    class_axis, kind = _class_axis(look_, axes[::-1])
    return axes, class_axis, kind


def _ctc(values: Any, look_: Look, options: Mapping[str, Any]) -> OutputTask | None:
    """A CTC output: scores per position where class 0 or the last wins many positions."""
    axes, class_axis, kind = _position_axes(look_)
    classes = values.shape[class_axis]
    if (look_.probabilities and kind == "scores") or classes < MIN_CTC_CLASSES:
        return None
    blank, share = dominant_class(values, class_axis)
    if share < CTC_BLANK_SHARE or blank not in (0, classes - 1):
        return None
    time_axis = axes[0] if class_axis == axes[1] else axes[1]
    chosen = options.get("ctc_blank")
    said = (f"blank {chosen} (--set ctc_blank)" if chosen is not None
            else f"class {blank} wins {100 * share:.0f}% of positions: the CTC blank")
    return OutputTask("ctc", f"{look_.shown}: {kind} over {classes} classes (axis {class_axis}) at "
                      f"{values.shape[time_axis]} positions; {said}; decoded greedily (repeats collapsed, "
                      "blanks dropped), whole strings compared (--set ctc_blank=K)",
                      {"class_axis": class_axis, "blank": int(blank if chosen is None else chosen)})


def _positions(values: Any, look_: Look) -> OutputTask:
    """Scores per position that are not CTC: independent probabilities, or classes per position."""
    _, class_axis, kind = _position_axes(look_)
    shown = look_.shown
    if look_.probabilities and kind == "scores":
        return OutputTask("multi-label", f"{shown}: {look_.range_text()} that sum to 1 along no axis: "
                          "independent probabilities (multi-label, e.g. note activations), each decided at 0.5, "
                          "compared by F1", {"threshold": 0.5})
    classes = values.shape[class_axis]
    params = {} if class_axis == len(values.shape) - 1 else {"class_axis": class_axis}
    return OutputTask("sequence", f"{shown}: {kind} per position over {classes} classes (axis {class_axis}), "
                      "compared position by position", params)


def _map(look_: Look, neighbours: Neighbours) -> OutputTask:
    shown = look_.shown
    channel_axis, channels, spatial = _channel_axis(look_)
    if channels > MAX_CHANNELS:
        return OutputTask("regression", f"{shown}: no small channel axis, compared as numbers")
    where = f"axis {channel_axis}"
    if channels == 1:
        threshold = 0.5 if look_.probabilities else 0.0
        kind = "probabilities" if look_.probabilities else f"scores ({look_.range_text()})"
        return OutputTask("map", f"{shown}: one channel ({where}) of {kind}: a map decided per pixel at "
                          f"{threshold:g}", {"channel_axis": channel_axis, "threshold": threshold})
    if channel_axis in look_.softmax_axes or channel_axis in look_.log_softmax_axes:
        return OutputTask("map", f"{shown}: class probabilities over {channels} channels ({where}): top-1 per "
                          "pixel compared", {"channel_axis": channel_axis})
    if look_.probabilities:
        return OutputTask("multi-label", f"{shown}: {look_.range_text()} that do not sum to 1 over the "
                          f"{channels} channels ({where}): independent probability maps, each pixel decided at "
                          "0.5, compared by F1", {"threshold": 0.5})
    if look_.low is not None and look_.low >= 0 and (look_.high or 0) > 1.5:
        return OutputTask("regression", f"{shown}: {look_.range_text()}, none negative: an image or a "
                          "density map, compared as numbers")
    beside = neighbours.probability_maps.get(spatial)
    if beside is not None:
        return OutputTask("regression", f"{shown} beside {beside!r}, which holds the class probabilities "
                          "per pixel: box offsets or similar, compared as numbers")
    return OutputTask("map", f"{shown}: scores over {channels} channels ({where}): top-1 per pixel compared",
                      {"channel_axis": channel_axis})


def _channel_axis(look_: Look) -> tuple[int, int, tuple[int, ...]]:
    """The channel axis of a map (the first or last axis of an example: the one the values
    are probabilities along, else the smaller, else the first), its size and the other sizes."""
    shape = look_.shape
    first, last = 1, len(shape)
    if first in look_.softmax_axes or first in look_.log_softmax_axes:
        axis = first
    elif last in look_.softmax_axes or last in look_.log_softmax_axes:
        axis = last
    else:
        axis = first if shape[0] <= shape[-1] else last
    spatial = tuple(size for index, size in enumerate(shape, start=1) if index != axis)
    return axis, shape[axis - 1], spatial


def _neighbours(looks: Mapping[str, Look]) -> Neighbours:
    classifier = next((name for name, item in looks.items()
                       if len(item.shape) == 1 and item.shape[0] >= 2 and 1 in item.softmax_axes), None)
    classes = looks[classifier].shape[0] if classifier is not None else 0
    maps: dict[tuple[int, ...], str] = {}
    for name, item in looks.items():
        if len(item.shape) >= 3:
            axis, channels, spatial = _channel_axis(item)
            if channels >= 2 and axis in item.softmax_axes:
                maps.setdefault(spatial, name)
    return Neighbours(classifier, classes, maps)


def _anchor_head(look_: Look, numbers_axis: int, options: Mapping[str, Any], why: str) -> OutputTask:
    numbers = look_.shape[numbers_axis - 1]
    declared = options.get("objectness")
    # YOLOv5/YOLOX export anchors first with an objectness score; YOLOv8 and later numbers first, without.
    objectness = bool(declared) if declared is not None else numbers_axis == 2
    classes = numbers - 4 - int(objectness)
    threshold = float(options.get("score_threshold") or SCORE_THRESHOLD)
    layout = "[N, A, 5+C] (objectness, then classes)" if objectness else "[N, 4+C, A]" if numbers_axis == 1 \
        else "[N, A, 4+C]"
    return OutputTask("detection", f"{look_.shown}: {why}; layout {layout}, {max(classes, 1)} classes; "
                      f"detections above score {threshold:g} after NMS compared at IoU 0.5 "
                      "(--set objectness=, score_threshold=)",
                      {"layout": "anchors", "numbers_axis": numbers_axis, "objectness": objectness,
                       "box_format": "cxcywh", "score_threshold": threshold, "nms_iou": NMS_IOU})


def box_score_pairs(specs: Sequence[TensorSpec], floats: Mapping[str, Any], looks: Mapping[str, Look],
                    options: Mapping[str, Any]) -> dict[str, str]:
    """``{boxes output: scores output}``: ``[N, A, 4]`` decoded boxes beside ``[N, A]`` or
    ``[N, A, C]`` scores over the same anchors (SSD, UltraFace), scores being probabilities
    or named like scores."""
    pairs: dict[str, str] = {}
    for spec in specs:
        item = looks.get(spec.name)
        declared = chosen_task(spec.name, options)
        if item is None or len(item.shape) != 2 or item.shape[1] != 4 or item.shape[0] < 2:
            continue
        if declared not in (None, "detection"):
            continue
        if declared is None and box_form(floats[spec.name]) is None:
            continue
        anchors = item.shape[0]
        candidates = [name for name, other in looks.items()
                      if name != spec.name and name not in pairs.values() and other.shape[:1] == (anchors,)
                      and len(other.shape) <= 2 and chosen_task(name, options) in (None, "detection")
                      and (len(other.shape) == 1 or other.shape[1] != 4)]
        scored = [name for name in candidates if looks[name].probabilities or SCORE_NAMES.search(name)]
        if scored:
            pairs[spec.name] = scored[0]
    return pairs


def _pair_boxes(name: str, scores: str, floats: Mapping[str, Any], looks: Mapping[str, Look],
                options: Mapping[str, Any]) -> OutputTask:
    boxes_look, scores_look = looks[name], looks[scores]
    form = box_form(floats[name]) or "xyxy"
    classes = scores_look.shape[1] if len(scores_look.shape) == 2 else 1
    if len(scores_look.shape) == 2 and 2 in scores_look.softmax_axes and classes >= 2:
        activation, background = "none", 0
        said = f"softmax over {classes} classes, class 0 the background"
    elif scores_look.probabilities:
        activation, background, said = "none", None, "probabilities"
    elif classes >= 2:
        activation, background = "softmax", 0
        said = f"logits over {classes} classes (softmax, class 0 the background)"
    else:
        activation, background, said = "sigmoid", None, "logits (sigmoid)"
    threshold = float(options.get("score_threshold") or SCORE_THRESHOLD)
    return OutputTask("detection", f"{boxes_look.shown} boxes ({form}) with {scores!r} {scores_look.shown} "
                      f"scores ({said}) over the same anchors; detections above score {threshold:g} after NMS "
                      "compared at IoU 0.5 (--set score_threshold=)",
                      {"layout": "pair", "scores": scores, "box_format": form, "activation": activation,
                       "background": background, "score_threshold": threshold, "nms_iou": NMS_IOU})


def _declared(task: str, name: str, values: Any, look_: Look, options: Mapping[str, Any]) -> OutputTask:
    said = f"set with --set task (task.{name})"
    shape = look_.shape
    if task == "probability" and math.prod(shape) > 1:
        task, said = "multi-label", f"{said} (probability, but {look_.shown} holds several: multi-label)"
    if task in ("probability", "multi-label"):
        threshold = 0.5 if look_.probabilities else 0.0
        return OutputTask(task, f"{said}; decided at {threshold:g}", {"threshold": threshold})
    if task in ("sequence", "ctc") and len(shape) >= 2:
        axes = (1, 2) if len(shape) == 2 else (1, len(shape))
        class_axis, _ = _class_axis(look_, axes[::-1])
        if task == "sequence":
            params = {} if class_axis == len(values.shape) - 1 else {"class_axis": class_axis}
            return OutputTask(task, f"{said}; classes on axis {class_axis}", params)
        blank = int(options.get("ctc_blank") or 0)
        return OutputTask(task, f"{said}; classes on axis {class_axis}, blank {blank} (--set ctc_blank=K)",
                          {"class_axis": class_axis, "blank": blank})
    if task == "map" and len(shape) == 2:
        threshold = 0.5 if look_.probabilities else 0.0
        return OutputTask(task, f"{said}; no channel axis, each pixel decided at {threshold:g}",
                          {"threshold": threshold})
    if task == "map" and len(shape) >= 3:
        axis, channels, _ = _channel_axis(look_)
        params: dict[str, Any] = {"channel_axis": axis}
        if channels == 1:
            params["threshold"] = 0.5 if look_.probabilities else 0.0
        return OutputTask(task, f"{said}; channels on axis {axis}", params)
    if task == "detection":
        if len(shape) == 2 and min(shape) >= 5:
            return _anchor_head(look_, 1 if shape[0] <= shape[1] else 2, options, said)
        if shape and shape[-1] == 4:
            return OutputTask(task, f"{said}; boxes (x1, y1, x2, y2) at fixed places, compared by IoU",
                              {"layout": "boxes"})
        return OutputTask(task, f"{said}; scores above 0.5 compared", {"layout": "scores"})
    return OutputTask(task, said)
