"""Static int8/uint8 for graphs that are not transformers: the configuration is chosen by
measured fidelity on the calibration data.

Which ops to quantize, per-channel or per-tensor weights, and the calibration method decide
how close a static int8 CNN stays to fp32, and no one setting wins everywhere: on
EfficientNet-Lite0 (depthwise convs, ReLU6) ONNX Runtime's default settings (every op,
per-tensor, minmax) agreed with fp32's top-1 on 61% of the images, per-channel weights on
every op on 83%, and the weighted ops alone left 3x the logits error
(benchmarks/bench_int8_cnn.py); on transformers, every op is the worst choice. So the step
tries a few configurations and keeps the best:

1. The graph goes through ONNX Runtime's ``quant_pre_process`` (kept when its outputs agree).
   Activation ranges are collected once (static_calibration.py) on the calibration examples
   minus a held-out slice (the last quarter, 4 to 64 examples; all of them are used, and
   scored on, when there are fewer than 8).
2. Stage one: every op ONNX Runtime quantizes, per-channel weights, with each calibration
   method (minmax, percentile, entropy), and ONNX Runtime's own defaults (every op,
   per-tensor, minmax). Stage two: the weighted ops only (Conv, ConvTranspose, Gemm, MatMul,
   Gather) with stage one's best method. Parameters the user set (``per_channel``,
   ``calibration_method``) fix their dimension.
3. Each candidate is quantized by ``quantize_static`` from the collected ranges (its
   calibration cache), loaded by ONNX Runtime and run on the held-out examples; its score is
   the mean over the model's outputs (a carried state excepted) of: for an ``[N, C]`` output,
   half its top-1 agreement with fp32 and half ``1 - relative error``; for other float
   outputs ``1 - relative error``; for integer outputs the share of equal values. NaN scores 0.
4. The best score wins (the earlier candidate on a tie); a candidate that fails (to quantize,
   or to load: an op ONNX Runtime cannot run quantized) is skipped with its reason. The
   winner is quantized again with the ranges of every calibration example (held-out ones
   added). Every candidate's score goes into the variant's ``int8_search`` metadata and the
   winner into a note.

Per-channel weights need DequantizeLinear's ``axis`` (opset 13): an older graph is converted
by ``onnx.version_converter`` first (checked against the original's outputs), or its weights
stay per-tensor when that fails; a note says which.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.plugin import CompressionError, Context, Step, UsageError
from compressor_onnx.quantize_failures import keep_for_debugging, kept_suffix, shown_reason
from compressor_onnx.static_calibration import (
    METHODS,
    CalibrationFeeds,
    RangeCollector,
    calibration_feeds,
)

#: DequantizeLinear's ``axis`` (per-channel weights) arrived in opset 13.
PER_CHANNEL_OPSET = 13
#: Held-out slice: a quarter of the calibration examples, within these bounds.
HELD_OUT_MIN, HELD_OUT_MAX, HELD_OUT_FROM = 4, 64, 8


@dataclass(frozen=True)
class Candidate:
    ops: str  # "all" (every op ONNX Runtime quantizes) or "weighted"
    per_channel: bool
    method: str

    @property
    def name(self) -> str:
        return f"{self.ops} ops, {'per-channel' if self.per_channel else 'per-tensor'}, {self.method}"

    @property
    def runtime_default(self) -> bool:
        """ONNX Runtime's ``quantize_static`` defaults."""
        return self.ops == "all" and not self.per_channel and self.method == "minmax"


@dataclass
class Trial:
    candidate: Candidate
    path: Path
    score: float | None = None
    agreement: float | None = None
    relative_error: float | None = None
    seconds: float = 0.0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"name": self.candidate.name, "ops": self.candidate.ops,
                                  "per_channel": self.candidate.per_channel,
                                  "calibration_method": self.candidate.method,
                                  "onnxruntime_default": self.candidate.runtime_default,
                                  "seconds": round(self.seconds, 2)}
        if self.error is not None:
            return {**record, "error": self.error}
        return {**record, "score": _round(self.score), "top1_agreement": _round(self.agreement),
                "relative_error": _round(self.relative_error)}


def quantize_generic_static(source: Path, target: Path, step: Step, excluded: list[str], context: Context,
                            reduce_range: bool) -> tuple[list[str], dict[str, Any]]:
    """Quantize the (small) model at ``source`` into ``target``: notes and metadata."""
    import onnx

    if context.calibration_data is None:
        raise UsageError(f"quantize {step.mode} needs --calibration-data")
    folder = target.parent
    per_channel = [True, False] if _searched(step, "per_channel") else [bool(step.params["per_channel"])]
    methods = list(METHODS) if _searched(step, "calibration_method") else [str(step.params["calibration_method"])]
    feeds = calibration_feeds(onnx.load(str(source), load_external_data=False), context.calibration_data,
                              int(step.params.get("calibration_samples", 128)), context.options)
    source, per_channel, notes, metadata = _prepared(source, folder, feeds, per_channel)
    held = min(HELD_OUT_MAX, max(HELD_OUT_MIN, feeds.count // 4)) if feeds.count >= HELD_OUT_FROM else 0
    calibrated = feeds.count - held
    context.progress(f"calibrating quantize {step.mode}", None)
    collector = RangeCollector(source, folder)
    collector.collect(feeds, 0, calibrated)
    search = _Search(source, folder, feeds, calibrated if held else 0, step, excluded, reduce_range)
    search.caches = _save_ranges(collector.ranges(), folder, "scored")
    trials = search.run(per_channel, methods)
    scored = [trial for trial in trials if trial.score is not None]
    failed = [trial for trial in trials if trial.error is not None]
    kept = keep_for_debugging([trial.path for trial in failed], "failed-int8")
    if not scored:
        reasons = "; ".join(f"{trial.candidate.name}: {trial.error}" for trial in failed)
        raise CompressionError(f"static {step.mode} quantization failed for every configuration tried "
                               f"({reasons}){kept_suffix(kept)}")
    chosen = max(scored, key=_score)
    refitted = held > 0 and _refit(collector, search, chosen, target)
    if not refitted:
        shutil.copyfile(chosen.path, target)
    default = next((trial for trial in trials if trial.candidate.runtime_default), None)
    where = (f"{held} held-out calibration examples (ranges from the other {calibrated}; the saved model's "
             f"from all {feeds.count})" if refitted else
             f"the {feeds.count} calibration examples it was calibrated on (fewer than {HELD_OUT_FROM})" if not held
             else f"{held} held-out calibration examples ({calibrated} calibrated on)")
    compared = (f"; ONNX Runtime's defaults (all ops, per-tensor, minmax): {_shown(default)}"
                if default is not None and default is not chosen else "")
    notes.append(f"static {step.mode}: {chosen.candidate.name} chosen by fidelity to fp32 on {where}, score "
                 f"{chosen.score:.4f}{compared}; {len(trials)} configurations in int8_search")
    notes += [f"static {step.mode}: {trial.candidate.name} failed: {trial.error}" for trial in failed]
    if kept is not None:
        notes.append(f"static {step.mode}: the configurations that failed are kept in {kept}")
    metadata.update({
        "static_ops": chosen.candidate.ops, "per_channel": chosen.candidate.per_channel,
        "calibration_method": chosen.candidate.method,
        "int8_search": {"chosen": chosen.candidate.name, "scored_with_ranges_from": calibrated,
                        "held_out_examples": held, "calibration_examples": feeds.count, "score": SCORE_HELP,
                        "candidates": [trial.to_json() for trial in trials]},
    })
    return notes, metadata


def _prepared(source: Path, folder: Path, feeds: CalibrationFeeds, per_channel: list[bool]
              ) -> tuple[Path, list[bool], list[str], dict[str, Any]]:
    """The graph to quantize: at opset 13 when per-channel weights are wanted (or per-tensor
    weights only), then through ONNX Runtime's ``quant_pre_process`` when its outputs agree."""
    import onnx

    notes: list[str] = []
    metadata: dict[str, Any] = {}
    model = onnx.load(str(source))
    opset = _opset(model)
    if opset < PER_CHANNEL_OPSET and True in per_channel:
        upgraded, reason = upgrade_opset(model, folder, feeds)
        if upgraded is not None:
            source = upgraded
            metadata["opset_converted"] = [opset, PER_CHANNEL_OPSET]
            notes.append(f"opset {opset} converted to {PER_CHANNEL_OPSET} (onnx.version_converter, outputs checked) "
                         "so that weights can be per-channel (DequantizeLinear's axis)")
        else:
            per_channel = [False]
            metadata["per_channel_refused"] = reason
            notes.append(f"opset {opset}: per-channel weights need opset {PER_CHANNEL_OPSET} and converting the "
                         f"graph failed ({reason}); weights are per-tensor")
    processed = folder / "preprocessed.onnx"
    if _pre_process(source, processed) and _same_outputs(source, processed, feeds):
        source = processed
        metadata["pre_processed"] = True
    else:
        notes.append("ONNX Runtime's quant_pre_process failed on this graph (or changed its outputs); "
                     "quantized without it")
    return source, per_channel, notes, metadata


def _refit(collector: RangeCollector, search: _Search, chosen: Trial, target: Path) -> bool:
    """Quantize the chosen configuration again with ranges from every calibration example
    (the held-out ones added); False when that model does not load (the scored one is kept)."""
    import onnxruntime as ort

    collector.collect(search.feeds, search.score_from, search.feeds.count)
    search.caches = _save_ranges(collector.ranges(), search.folder, "all")
    try:
        search.quantize(chosen.candidate, target)
        ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - the quantizer and the runtime raise anything
        return False
    return True


SCORE_HELP = ("mean over outputs: [N, C] outputs 0.5 x top-1 agreement + 0.5 x (1 - relative error); other "
              "float outputs 1 - relative error; integer outputs share of equal values; vs fp32")


class _Search:
    """Candidates quantized from the collected ranges (``caches``) and scored on the held-out examples."""

    def __init__(self, source: Path, folder: Path, feeds: CalibrationFeeds, score_from: int, step: Step,
                 excluded: list[str], reduce_range: bool) -> None:
        self.source, self.folder, self.feeds, self.score_from = source, folder, feeds, score_from
        self.step, self.excluded, self.reduce_range = step, excluded, reduce_range
        self.caches: dict[str, Path] = {}
        self.reference = _run(source, feeds, score_from)
        self.done: dict[Candidate, Trial] = {}

    def run(self, per_channel: list[bool], methods: list[str]) -> list[Trial]:
        """Stage one (every op: each method, and ONNX Runtime's defaults), then stage two (weighted ops)."""
        first = [Candidate("all", per_channel[0], method) for method in methods]
        if per_channel[0] and False in per_channel and "minmax" in methods:
            first.append(Candidate("all", False, "minmax"))
        trials = [self.try_candidate(candidate) for candidate in first]
        best = max((t for t in trials if t.score is not None and t.candidate.per_channel == per_channel[0]),
                   key=_score, default=None)
        second = ([Candidate("weighted", per_channel[0], best.candidate.method)] if best is not None
                  else [Candidate("weighted", per_channel[0], method) for method in methods])
        return trials + [self.try_candidate(candidate) for candidate in second]

    def try_candidate(self, candidate: Candidate) -> Trial:
        if candidate in self.done:
            return self.done[candidate]
        started = time.perf_counter()
        trial = Trial(candidate, self.folder / f"int8-{len(self.done)}.onnx")
        try:
            self.quantize(candidate, trial.path)
            outputs = _run(trial.path, self.feeds, self.score_from)
            trial.score, trial.agreement, trial.relative_error = fidelity(self.reference, outputs,
                                                                          set(self.feeds.state))
        except Exception as error:  # noqa: BLE001 - the quantizer and the runtime raise anything
            trial.error = shown_reason(error)
        trial.seconds = time.perf_counter() - started
        self.done[candidate] = trial
        return trial

    def quantize(self, candidate: Candidate, path: Path) -> None:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        from compressor_onnx.quantize_common import (
            STATIC_OPS,
            calibration_method,
            op_types,
            quiet_ort,
        )

        if candidate.ops == "weighted":
            ops: list[str] | None = op_types(STATIC_OPS, self.step)
        else:
            ops = op_types(sorted(all_static_ops()), self.step) if self.step.params.get("exclude_op_types") else None
        with quiet_ort():
            quantize_static(
                str(self.source), str(path), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=ops,
                per_channel=candidate.per_channel, reduce_range=self.reduce_range,
                activation_type=QuantType.QUInt8 if self.step.mode == "uint8" else QuantType.QInt8,
                weight_type=QuantType.QInt8, nodes_to_exclude=self.excluded,
                calibrate_method=calibration_method(candidate.method),
                calibration_cache_path=str(self.caches[candidate.method]),
            )


def all_static_ops() -> set[str]:
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return set(QLinearOpsRegistry) | set(QDQRegistry)


def fidelity(reference: list[Mapping[str, Any]], outputs: list[Mapping[str, Any]],
             skipped: set[str]) -> tuple[float, float | None, float | None]:
    """``(score, mean top-1 agreement of [N, C] outputs, mean relative error of float outputs)``."""
    import numpy as np

    scores, agreements, errors = [], [], []
    for name in reference[0]:
        if name in skipped:
            continue
        wanted = [np.asarray(batch[name]) for batch in reference]
        got = [np.asarray(batch[name]) for batch in outputs]
        if any(a.shape != b.shape for a, b in zip(wanted, got)):
            scores.append(0.0)
            continue
        if wanted[0].dtype.kind != "f":
            scores.append(float(np.mean([np.mean(a == b) for a, b in zip(wanted, got)])))
            continue
        if not all(np.isfinite(b).all() for b in got):
            scores.append(0.0)
            continue
        difference = sum(float(np.sum((b.astype(np.float64) - a) ** 2)) for a, b in zip(wanted, got))
        size = sum(float(np.sum(a.astype(np.float64) ** 2)) for a in wanted)
        error = (difference / size) ** 0.5 if size > 0 else float(difference > 0)
        errors.append(error)
        closeness = max(0.0, 1.0 - error)
        if all(a.ndim == 2 and a.shape[1] >= 2 for a in wanted):
            same = sum(int(np.sum(a.argmax(1) == b.argmax(1))) for a, b in zip(wanted, got))
            agreement = same / sum(len(a) for a in wanted)
            agreements.append(agreement)
            scores.append(0.5 * agreement + 0.5 * closeness)
        else:
            scores.append(closeness)
    mean = float(np.mean(scores)) if scores else 0.0
    return (mean, float(np.mean(agreements)) if agreements else None,
            float(np.mean(errors)) if errors else None)


def upgrade_opset(model: Any, folder: Path, feeds: CalibrationFeeds) -> tuple[Path | None, str]:
    """``model`` converted to opset 13 and saved, if the converter manages and the outputs agree."""
    import onnx

    try:
        converted = onnx.version_converter.convert_version(model, PER_CHANNEL_OPSET)
        path = folder / f"opset{PER_CHANNEL_OPSET}.onnx"
        onnx.save_model(converted, str(path))
        original = folder / "original.onnx"
        onnx.save_model(model, str(original))
        if not _same_outputs(original, path, feeds):
            return None, "the converted graph's outputs differ from the original's"
    except Exception as error:  # noqa: BLE001 - the converter and the runtime raise anything
        return None, shown_reason(error)
    return path, ""


def _same_outputs(original: Path, changed: Path, feeds: CalibrationFeeds) -> bool:
    """Both graphs give the same outputs (to float tolerance) on the first calibration call."""
    import numpy as np

    try:
        stop = min(feeds.count, feeds.batch)
        before, after = _run(original, feeds, 0, stop), _run(changed, feeds, 0, stop)
    except Exception:  # noqa: BLE001 - the runtime raises anything
        return False
    return all(
        np.shape(before[0][name]) == np.shape(after[0].get(name)) and
        np.allclose(before[0][name], after[0][name], rtol=1e-3, atol=1e-4, equal_nan=True)
        for name in before[0]
    )


def _pre_process(source: Path, target: Path) -> bool:
    """ONNX Runtime's recommended ``quant_pre_process`` (shape inference, graph optimizations that
    fold and fuse, e.g. Pad into Conv); False when it fails (with and without symbolic shapes)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from compressor_onnx.quantize_common import quiet_ort

    for attempt in ({}, {"skip_symbolic_shape": True}):
        try:
            with quiet_ort():
                quant_pre_process(str(source), str(target), auto_merge=True, **attempt)
            return True
        except Exception:  # noqa: BLE001,S112 - shape inference raises anything; try without it
            continue
    return False


def _run(path: Path, feeds: CalibrationFeeds, start: int, stop: int | None = None) -> list[Mapping[str, Any]]:
    """The model's outputs by name on examples ``start`` to ``stop``, one mapping per call."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]

    def call(inputs: dict[str, Any]) -> dict[str, Any]:
        return dict(zip(names, session.run(names, inputs)))

    end = feeds.count if stop is None else stop
    return [outputs for _, outputs in feeds.run(start, end, call)]


def _save_ranges(ranges: Mapping[str, Any], folder: Path, label: str) -> dict[str, Path]:
    from onnxruntime.quantization.calibrate import save_tensors_data

    caches = {}
    for method, data in ranges.items():
        caches[method] = folder / f"ranges-{label}-{method}.json"
        save_tensors_data(data, caches[method])
    return caches


def _searched(step: Step, name: str) -> bool:
    """The user left ``name`` to the search (not given, or filled in with its default)."""
    return name in step.defaulted or name not in step.params


def _opset(model: Any) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 1)


def _score(trial: Trial) -> float:
    return trial.score if trial.score is not None else -1.0


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _shown(trial: Trial) -> str:
    return f"{trial.score:.4f}" if trial.score is not None else f"failed ({trial.error})"
