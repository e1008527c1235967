"""A run's variants made through one :mod:`~compressor.step_tree`: each shared step once.

``--prune 0.5 -q dynamic -q int8`` prunes (and fine-tunes) once, then forks the pruned
model for each quantize mode (``compressor_fork`` on the intermediate model); the
variants' results are what making each on its own gives (the same notes, metadata and
files), except ``compress_seconds``, which counts each variant's whole path (shared
steps included: what the variant costs on its own, as before) and the peak RSS, the
highest along that path. A step that fails fails every variant under it, each named.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from compressor.errors import CompressionError, UnsupportedError
from compressor.memory import PeakRss
from compressor.models import Artifact, Model
from compressor.plugins import plugin_errors
from compressor.recipes import Variant
from compressor.report import VariantResult
from compressor.session import Session, plugin_raised
from compressor.step_tree import Cost, Failed, Node, build, count_steps, walk

#: A variant made (its result, and its staged artifact or None), or why a default one was not.
Made = tuple[VariantResult, Artifact | None] | UnsupportedError


def units(variants: Sequence[Variant]) -> int:
    """Units of progress :func:`make_variants` counts: each step of the tree once, each save."""
    return count_steps(build(variants)) + len(variants)


class _SessionSteps:
    """The session's forks, steps and saves, for :func:`compressor.step_tree.walk`."""

    def __init__(self, session: Session, variants: Sequence[Variant], labels: Sequence[str]) -> None:
        self.session, self.variants, self.labels = session, variants, labels

    def _names(self, node: Node) -> str:
        return ", ".join(repr(self.variants[index].name) for index in node.under)

    def _label(self, node: Node) -> str:
        first = self.labels[node.under[0]]
        return first if len(node.under) == 1 else f"{first} (and {len(node.under) - 1} more)"

    def fork_original(self, node: Node) -> Model:
        return self.session.fork_original(self._names(node))

    def fork(self, model: Model, node: Node) -> Model | None:
        session = self.session
        backend = session.backend
        with plugin_raised(backend, f"while forking the model after '{node.path[-2]}' for {self._names(node)}"), \
                plugin_errors(backend):
            return session.host.hook_for(backend.name, "compressor_fork")(model=model, context=session.context)

    def apply(self, model: Model, node: Node) -> Model:
        assert node.step is not None
        self.session.tell(self._label(node), str(node.step))
        return self.session.apply(model, node.step)

    def save(self, model: Model, index: int, cost: Cost) -> tuple[VariantResult, Artifact]:
        variant, session = self.variants[index], self.session
        session.tell(self.labels[index], "saving")
        started = time.perf_counter()
        with PeakRss() as peak:
            staged = session.save(model, variant.name)
        total = cost.plus(time.perf_counter() - started, peak.bytes)
        return session.made(variant, model, staged, total.seconds, total.peak_rss_bytes), staged


def make_variants(session: Session, variants: Sequence[Variant], labels: Sequence[str]) -> list[Made]:
    """Every variant made and saved into staging, in order, each shared step once: its result
    (with its error set where a step failed) and staged artifact, or the ``UnsupportedError``
    of a step the model cannot take (the caller decides: an error, or a default left out)."""
    outcomes = walk(build(variants), _SessionSteps(session, variants, labels), len(variants),
                    unsupported_fails=session.optional)
    made: list[Made] = []
    for variant, outcome in zip(variants, outcomes):
        if not isinstance(outcome, Failed):
            made.append(outcome)
        elif isinstance(outcome.error, UnsupportedError):
            made.append(outcome.error)
        else:
            assert isinstance(outcome.error, CompressionError)
            made.append((session.failed(variant, outcome.error), None))
    return made
