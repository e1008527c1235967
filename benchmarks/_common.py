"""Shared helpers for benchmark scripts: machine description and docs/benchmarks.md sections.

Each benchmark prints its table and replaces its own section of
``docs/benchmarks.md`` (between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
SHARED = ROOT.parent / "shared"
HEADER = "# Benchmarks\n\nEvery number here was measured by the script named in its section.\n"
# Every figure measured now, never one an earlier run left in the cache (a script opts in itself).
os.environ.setdefault("COMPRESSOR_CACHE", "off")


def machine(distributions: Iterable[str] = ()) -> str:
    """One line: CPU model, flags, cores, Python and library versions."""
    from compressor.environment import describe

    env = describe(distributions)
    cpu = env["cpu"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    return (
        f"Machine: {cpu['model']} ({cpu['cores']} cores; {', '.join(cpu['flags'])}), "
        f"Python {env['python']}. Versions: {versions}. "
        f"Measured {_dt.date.today().isoformat()}."
    )


def train_classifier(module: Any, x: Any, y: Any, epochs: int = 40) -> Any:
    """Train a torch classifier with Adam (1e-3) and cross-entropy in shuffled batches of 64;
    returns it in eval mode. Seed torch before building ``module`` for the same run."""
    import torch

    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(module(x[batch]), y[batch]).backward()
            optimizer.step()
    return module.eval()


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, markdown: str) -> None:
    """Replace (or append) the section ``name`` of docs/benchmarks.md."""
    DOC.parent.mkdir(exist_ok=True)
    text = DOC.read_text() if DOC.exists() else HEADER
    block = f"<!-- {name}:start -->\n{markdown.strip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    handle, temporary = tempfile.mkstemp(dir=DOC.parent)
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
    os.chmod(temporary, 0o644)
    os.replace(temporary, DOC)


def compressor_cli(*args: str, env: dict[str, str] | None = None,
                   check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real ``compressor`` CLI (``python -m compressor``) and fail loudly (exit 6,
    a variant outside the budget, is not a failure with ``check=False``)."""
    result = subprocess.run(
        [sys.executable, "-m", "compressor", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if result.returncode != 0 and (check or result.returncode not in (6, 7)):
        raise SystemExit(f"compressor {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result
