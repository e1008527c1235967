"""The generation table of a report: for causal LMs measured generating
(:mod:`compressor.generation`), each variant's time to first token, decode speed and its
share of the memory-bandwidth bound, greedy agreement and perplexity, under the main table."""

from __future__ import annotations

from typing import Any

from compressor.results import ReportData

COLUMNS = ("variant", "TTFT ms", "decode tok/s", "of bound", "greedy", "exact", "window ppl", "KL")


def _cell(metrics: dict[str, Any], key: str, kind: str) -> str:
    value = metrics.get(key)
    if not isinstance(value, (int, float)):
        return "-"
    if kind == "share":
        return f"{100 * value:.0f}%"
    if kind == "ratio":
        return f"{value:.2f}"
    if kind == "kl":
        return f"{value:.2g}"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def generation_rows(report: ReportData) -> list[list[str]]:
    """One row per variant measured generating; [] when none was."""
    rows = []
    for variant in report.variants:
        metrics = variant.metrics
        if "decode_tokens_per_s" not in metrics:
            continue
        # The original is compared with itself too: its greedy figures are 1.
        rows.append([variant.name, _cell(metrics, "ttft_ms", "number"),
                     _cell(metrics, "decode_tokens_per_s", "number"), _cell(metrics, "bandwidth_share", "share"),
                     _cell(metrics, "greedy_agreement", "ratio"), _cell(metrics, "greedy_exact", "ratio"),
                     _cell(metrics, "window_perplexity", "ratio"), _cell(metrics, "kl_divergence", "kl")])
    return rows


def generation_lines(report: ReportData) -> list[str]:
    """The generation table as text lines with its legend; [] when no variant generated."""
    rows = generation_rows(report)
    if not rows:
        return []
    first = next(v.metrics for v in report.variants if "decode_tokens_per_s" in v.metrics)
    table = [list(COLUMNS), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = ["", f"generation (batch 1, {first.get('prompt_tokens', '?')}-token prompts, "
                 f"{first.get('new_tokens', '?')} new tokens, greedy):"]
    for index, row in enumerate(table):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    bandwidth = first.get("memory_bandwidth_gbs")
    lines.append("of bound: decode tok/s / (memory bandwidth"
                 + (f" {bandwidth:.1f} GB/s" if isinstance(bandwidth, (int, float)) else "")
                 + " / weight bytes); greedy: share of tokens before the first divergence from the "
                   "original's; exact: prompts generated identically; KL: mean KL divergence "
                   "from the original's next-token distribution on the data, in nats")
    over = [v.name for v in report.variants if (v.metrics.get("bandwidth_share") or 0) > 1]
    if over:
        lines.append(f"warning: {', '.join(over)} decoded past the bound: the copy probe understated the memory "
                     "bandwidth (a busy machine while it ran?); --set memory_bandwidth_gbs= states it")
    return lines
