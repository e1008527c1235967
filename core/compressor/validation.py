"""Check a request against a backend's declaration before any work starts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from compressor.errors import UnsupportedError, UsageError
from compressor.models import Context, MeasureSettings, Step
from compressor.recipes import Variant
from compressor.specs import EVERY_STEP, MEASURE_OPTION_FAMILIES, MEASURE_OPTIONS, TASKS, Backend

_DATA_FLAGS = {"calibration": "--calibration-data", "train": "--train-data", "eval": "--data"}


def validate_step(backend: Backend, step: Step) -> Step:
    """Coerce a step's parameters; unknown techniques, modes and keys list the valid ones."""
    technique = backend.technique(step.technique)
    params: dict[str, Any] = {}
    for key, value in step.params.items():
        if key == "mode" and technique.modes:
            mode = str(value).lower()
            if mode not in technique.modes:
                raise UnsupportedError(
                    f"backend {backend.name!r} does not support {step.technique} mode {mode!r}; "
                    f"it supports: {', '.join(technique.modes)}"
                )
            params[key] = mode
        elif key in technique.params:
            params[key] = technique.params[key].coerce(key, value)
        else:
            valid = (["mode"] if technique.modes else []) + list(technique.params)
            raise UsageError(
                f"unknown parameter {key!r} for {step.technique} on backend {backend.name!r}; "
                f"valid: {', '.join(valid) or 'none'}"
            )
    if technique.modes and "mode" not in params:
        raise UsageError(f"{step.technique} needs a mode: one of {', '.join(technique.modes)}")
    for key, param in technique.params.items():
        if param.required and key not in params:
            raise UsageError(f"{step.technique} needs {key} ({param.help or param.type.__name__})")
    defaulted = {key: param.default for key, param in technique.params.items()
                 if key not in params and param.default is not None}
    return Step(step.technique, {**params, **defaulted}, frozenset(defaulted),
                positional=technique.positional or step.positional)


def apply_settings(
    backend: Backend, variants: Sequence[Variant], settings: Mapping[str, str]
) -> tuple[list[Variant], dict[str, Any]]:
    """Split ``--set KEY=VALUE`` pairs into backend options and step parameters,
    then validate every step. Returns the validated variants and the options."""
    options = {key: param.default for key, param in backend.options.items()}
    step_settings: dict[str, str] = {}
    used_techniques = {step.technique for variant in variants for step in variant.steps}
    for key, value in settings.items():
        if key in backend.options:
            options[key] = backend.options[key].coerce(key, value)
            continue
        if key in MEASURE_OPTIONS:
            options[key] = MEASURE_OPTIONS[key].coerce(key, value)
            continue
        family = next((prefix for prefix in MEASURE_OPTION_FAMILIES if key.startswith(prefix)), None)
        if family is not None and len(key) > len(family):
            if family == "task." and value not in TASKS:
                raise UsageError(f"{key}={value!r} is not one of: {', '.join(TASKS)}")
            options[key] = value
            continue
        if not any(
            key in backend.techniques[name].params
            for name in used_techniques
            if name in backend.techniques
        ):
            valid = sorted(
                set(backend.options) | set(MEASURE_OPTIONS) | {f"{prefix}NAME" for prefix in MEASURE_OPTION_FAMILIES}
                | {
                    key
                    for name in used_techniques
                    if name in backend.techniques
                    for key in backend.techniques[name].params
                }
            )
            raise UsageError(
                f"unknown --set key {key!r} for backend {backend.name!r}; valid: "
                f"{', '.join(valid) or 'none'}"
            )
        step_settings[key] = value
    for key, param in backend.options.items():
        if param.required and options.get(key) is None:
            raise UsageError(f"backend {backend.name!r} needs --set {key}=... ({param.help})")
    validated = []
    for variant in variants:
        steps = []
        for step in variant.steps:
            extra = {
                key: value
                for key, value in step_settings.items()
                if step.technique in backend.techniques
                and key in backend.techniques[step.technique].params
            }
            clash = sorted(key for key in extra if key in step.params)
            if clash:
                raise UsageError(
                    f"--set {clash[0]}={extra[clash[0]]} conflicts with '{step}' in variant "
                    f"{variant.name!r}, which sets {clash[0]} itself; give it in one place"
                )
            steps.append(validate_step(backend, replace(step, params={**step.params, **extra})))
        validated.append(Variant(variant.name, tuple(steps)))
    return validated, options


def check_data(backend: Backend, variants: Sequence[Variant], context: Context | Mapping[str, object]) -> None:
    """Refuse steps whose data (calibration, training) was not given: ``context``'s loaded
    data, or ``{"calibration": path_or_None, "train": ..., "eval": ...}`` before loading."""
    available = context if isinstance(context, Mapping) else {
        "calibration": context.calibration_data,
        "train": context.train_data,
        "eval": context.eval_data,
    }
    for variant in variants:
        for step in variant.steps:
            technique = backend.techniques[step.technique]
            for trigger, purpose in technique.requires_data.items():
                wanted = trigger == EVERY_STEP or step.mode == trigger or step.params.get(trigger) is True
                if wanted and available.get(purpose) is None:
                    raise UsageError(
                        f"variant {variant.name!r}: '{step}' needs "
                        f"{_DATA_FLAGS.get(purpose, purpose)} on backend {backend.name!r}"
                    )


def check_measure_request(settings: MeasureSettings, repeats: int, budgets: Mapping[str, float | None]) -> None:
    """The CLI's bounds on measuring, for every caller (the Python API too)."""
    import math
    import os

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not 1 <= settings.threads <= available:
        raise UsageError(f"threads={settings.threads}: between 1 and the {available} CPUs this process may use")
    if not 1 <= repeats <= 1000:
        raise UsageError(f"repeats={repeats}: between 1 and 1000")
    if not (math.isfinite(settings.min_seconds) and 0 <= settings.min_seconds <= 3600):
        raise UsageError(f"min_seconds={settings.min_seconds}: a number of seconds from 0 to 3600")
    if settings.max_examples is not None and settings.max_examples < 1:
        raise UsageError(f"max_examples={settings.max_examples}: at least 1")
    limits = {"max_accuracy_drop": (0.0, 100.0), "min_agreement": (0.0, 1.0), "min_cosine": (-1.0, 1.0)}
    for name, value in budgets.items():
        low, high = limits[name]
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            raise UsageError(f"{name}={value}: a finite number from {low:g} to {high:g}")
