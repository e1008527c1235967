"""Warnings a report gives about a variant that is worse than it looks.

A variant with a warning is still reported with all its numbers, but is never
named a best trade-off (the HTML's Pareto front, :meth:`Report.best`).
"""

from __future__ import annotations

from typing import Any

from compressor.results import ReportData, VariantResult

#: A variant this much slower than the original (batch-1 p50) is flagged...
SLOWER_BY = 0.10
#: ...when it is also slower than 90% of the original's calls and by more than this
#: many milliseconds: below it, scheduling noise decides which of two runs wins.
SLOWER_NOISE_MS = 0.05
#: A variant agreeing with the original on fewer examples than this is flagged.
MIN_AGREEMENT = 0.90
#: A variant whose file and gzip size are both above this share of the original's compressed nothing.
NOT_SMALLER = 0.95
#: CPU flags with 8-bit integer dot products; without them int8 kernels use AVX2 (u8 x s8 pairs can saturate).
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
#: Modes of the shared vocabulary whose kernels are 8-bit integer (``QUANTIZE_MODES``).
INT8_MODES = ("dynamic", "int8", "uint8")


def apply_cautions(report: ReportData) -> None:
    """Fill each variant's ``warnings`` and add the run-wide ones to the original's notes."""
    if not report.variants:
        return
    original = report.variants[0]
    for variant in report.variants[1:]:
        if variant.error is None:
            variant.warnings = variant_warnings(variant, original)
    original.warnings.extend(nonfinite_warnings(original.metrics, of_original=True))
    if not any(_fidelity(v.metrics) for v in report.variants):
        original.warnings.append("no evaluation data: how faithful the variants are was not measured "
                                 "(pass --data)")
    note = _int8_cpu_note(report)
    if note:
        original.notes.append(note)


def variant_warnings(variant: VariantResult, original: VariantResult) -> list[str]:
    found = []
    metrics, reference = variant.metrics, original.metrics
    p50, base = _p50(metrics), _p50(reference)
    low = metrics.get("latency_ratio_low")
    if isinstance(low, (int, float)) and isinstance(metrics.get("latency_ratio"), (int, float)):
        # Timed side by side with the original: slower only if the whole interval says so.
        ratio = float(metrics["latency_ratio"])
        if low > 1 + SLOWER_BY and (p50 is None or base is None or p50 - base > SLOWER_NOISE_MS):
            found.append(f"slower than the original: {ratio:.2f}x its latency side by side "
                         f"(95% interval {low:.2f}-{float(metrics['latency_ratio_high']):.2f}x)")
    elif p50 is not None and base and _clearly_slower(p50, base, _latency(reference).get("p90")):
        found.append(f"slower than the original: p50 {p50:.3g} ms vs {base:.3g} ms "
                     f"(+{100 * (p50 / base - 1):.0f}%)")
    found.extend(nonfinite_warnings(metrics))
    agreement = metrics.get("agreement")
    if isinstance(agreement, float) and agreement < MIN_AGREEMENT:
        kind = metrics.get("agreement_kind", "top-1")
        found.append(f"agrees with the original on only {100 * agreement:.1f}% ({kind})")
    size, gzip = metrics.get("size_bytes"), metrics.get("size_gzip_bytes")
    base_size, base_gzip = reference.get("size_bytes"), reference.get("size_gzip_bytes")
    if (size and base_size and gzip and base_gzip
            and size >= NOT_SMALLER * base_size and gzip >= NOT_SMALLER * base_gzip):
        found.append(f"nothing was compressed: {size / base_size:.2f}x the original's size "
                     f"(gzip {gzip / base_gzip:.2f}x)")
    return found


def nonfinite_warnings(metrics: dict[str, Any], of_original: bool = False) -> list[str]:
    """One warning per output holding NaN or Inf, with how many examples (such an example
    counts as changed, and the variant fails every fidelity budget; see evaluation)."""
    found = []
    for name, counts in (metrics.get("nonfinite") or {}).items():
        if not isinstance(counts, dict) or not counts.get("examples"):
            continue
        examples, share = counts["examples"], float(counts.get("share") or 0)
        total = round(examples / share) if share else examples
        before = counts.get("original_examples", 0)
        if of_original:
            where = "in the original itself"
        elif counts.get("new_examples") == 0 and before:
            where = "as the original's does"
        elif before:
            where = f"the original's for {before}"
        else:
            where = "where the original's never does"
        found.append(f"output {name} holds NaN or Inf for {examples} of {total} examples "
                     f"({100 * share:.1f}%), {where}")
    return found


def _clearly_slower(p50: float, base: float, base_p90: Any) -> bool:
    above_spread = not isinstance(base_p90, (int, float)) or p50 > base_p90
    return p50 > base * (1 + SLOWER_BY) and p50 - base > SLOWER_NOISE_MS and above_spread


def _latency(metrics: dict[str, Any]) -> dict[str, Any]:
    latency = metrics.get("latency_ms")
    return latency if isinstance(latency, dict) else {}


def _p50(metrics: dict[str, Any]) -> float | None:
    value = _latency(metrics).get("p50")
    return value if isinstance(value, float) else None


def _fidelity(metrics: dict[str, Any]) -> bool:
    return any(key in metrics for key in ("agreement", "cosine", "accuracy", "outputs"))


def _int8_mode(step: str) -> bool:
    """Whether a step's text (``quantize int8``, ``mytech mode=dynamic``) has an int8 mode,
    written bare after the technique or as ``mode=``."""
    words = step.split()
    return (len(words) > 1 and words[1] in INT8_MODES) or any(f"mode={mode}" in words for mode in INT8_MODES)


def _int8_cpu_note(report: ReportData) -> str | None:
    uses_int8 = any(_int8_mode(step) for v in report.variants for step in v.steps)
    cpu = report.environment.get("cpu", {}) if isinstance(report.environment, dict) else {}
    flags = set(cpu.get("flags", [])) if isinstance(cpu, dict) else set()
    if not uses_int8 or not flags or flags & set(INT8_DOT_FLAGS):
        return None
    return (f"this CPU ({cpu.get('model', 'unknown')}) has no 8-bit dot-product instructions "
            "(VNNI/AMX): int8 kernels run on AVX2, so int8 speed-ups are smaller than on such CPUs")
