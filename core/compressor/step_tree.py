"""The steps of all variants as one tree: a shared prefix is computed once, then forked.

``prune 0.5 -> quantize dynamic`` and ``prune 0.5 -> quantize int8`` share their first
node: the model is pruned (and fine-tuned) once, and each quantize step starts from a
fork of the pruned model (``compressor_fork``, called on the intermediate model as on
the loaded one). A step's identity is its technique, its resolved parameters (defaults
included) and which of them were defaulted (a backend may tell them apart), so steps
that differ in anything are different nodes.

:func:`walk` visits the tree depth first, holding at most one model per level of the
path it is on: each node's variants are saved, then its children made, the last one
from the node's own model (no fork), the others from forks. Where the backend has no
fork for a model (or its fork fails on an intermediate one), the prefix is made again
for that child, as each variant was made on its own before. A step that fails fails
every variant under it, each with the same error; an unsupported step (a default
variant the model cannot take) likewise marks every variant under it.

This module knows no plugin: the session's side (forks, steps, saves) is a
:class:`TreeSteps`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from compressor.errors import CompressionError, UnsupportedError
from compressor.memory import PeakRss
from compressor.models import Step
from compressor.recipes import Variant

M = TypeVar("M")
S = TypeVar("S")


def step_key(step: Step) -> str:
    """What makes two steps the same computation: technique, resolved parameters, defaulted names."""
    params = json.dumps(dict(step.params), sort_keys=True, default=repr)
    return f"{step.technique}|{params}|{','.join(sorted(step.defaulted))}"


@dataclass
class Node:
    """One step (None at the root: the loaded model), the variants ending here, and the next steps."""

    step: Step | None
    #: Indexes (into the variants given to :func:`build`) of the variants whose last step this is.
    ending: list[int] = field(default_factory=list)
    children: dict[str, Node] = field(default_factory=dict)
    #: Indexes of every variant under this node, in order.
    under: list[int] = field(default_factory=list)
    #: The steps from the root to here.
    path: tuple[Step, ...] = ()


def build(variants: Sequence[Variant]) -> Node:
    """The tree of ``variants``' steps (children in the order the variants first name them)."""
    root = Node(None)
    for index, variant in enumerate(variants):
        node = root
        node.under.append(index)
        for step in variant.steps:
            key = step_key(step)
            if key not in node.children:
                node.children[key] = Node(step, path=(*node.path, step))
            node = node.children[key]
            node.under.append(index)
        node.ending.append(index)
    return root


def count_steps(root: Node) -> int:
    """Steps :func:`walk` computes (each node once), not counting saves."""
    return sum(1 + count_steps(child) for child in root.children.values())


@dataclass
class Cost:
    """What a variant's model cost to make: seconds and the highest peak RSS along its path."""

    seconds: float = 0.0
    peak_rss_bytes: int | None = None

    def plus(self, seconds: float, peak: int | None) -> Cost:
        peaks = [value for value in (self.peak_rss_bytes, peak) if value is not None]
        return Cost(self.seconds + seconds, max(peaks) if peaks else None)


class TreeSteps(Protocol[M, S]):
    """What :func:`walk` asks of the session (each may raise ``CompressionError``)."""

    def fork_original(self, node: Node) -> M:
        """A fresh starting point from the loaded model for the variants under ``node``."""

    def fork(self, model: M, node: Node) -> M | None:
        """An independent copy of the intermediate ``model`` for ``node``; None: the backend has none."""

    def apply(self, model: M, node: Node) -> M:
        """``node.step`` applied to ``model``."""

    def save(self, model: M, index: int, cost: Cost) -> S:
        """Variant ``index``'s model saved: what the walk returns for it."""


@dataclass
class Failed:
    """A variant that was not made: the step's error (every variant under the step gets it)."""

    error: CompressionError | UnsupportedError


class _Walk(Generic[M, S]):
    def __init__(self, steps: TreeSteps[M, S], caught: tuple[type[Exception], ...]) -> None:
        self.steps, self.caught = steps, caught
        self.made: dict[int, S | Failed] = {}

    def timed(self, action: object, *args: object) -> tuple[M, float, int | None]:
        started = time.perf_counter()
        with PeakRss() as peak:
            model = action(*args)  # type: ignore[operator]
        return model, time.perf_counter() - started, peak.bytes

    def fail(self, node: Node, error: CompressionError | UnsupportedError) -> None:
        for index in node.under:
            self.made.setdefault(index, Failed(error))

    def start(self, node: Node, parent: list[M], last: bool, cost: Cost, root: Node) -> None:
        """Make ``node``'s model from its parent's (``parent`` holds it; emptied when ``last``)."""
        try:
            if not parent:  # a child of the root: a fork of the loaded model, as each variant had
                model, seconds, peak = self.timed(self.steps.fork_original, node)
            elif last:
                model, seconds, peak = parent.pop(), 0.0, None
            else:
                try:
                    model, seconds, peak = self.timed(self.steps.fork, parent[0], node)
                except CompressionError:
                    model = None  # a fork made for loaded models only: made again, as before
                if model is None:
                    self.replay(node, root)
                    return
            cost = cost.plus(seconds, peak)
            model, seconds, peak = self.timed(self.steps.apply, model, node)
        except self.caught as error:  # type: ignore[misc]
            self.fail(node, error)
            return
        held = [model]
        del model  # held alone keeps it: the last child takes it over
        self.visit(node, held, cost.plus(seconds, peak), root)

    def replay(self, node: Node, root: Node) -> None:
        """No fork of the parent's model: ``node``'s prefix made again from the loaded model."""
        chain = [root]
        for step in node.path:
            chain.append(chain[-1].children[step_key(step)])
        held: list[M] = []
        cost = Cost()
        for depth, current in enumerate(chain[1:], start=1):
            try:
                if depth == 1:
                    model, seconds, peak = self.timed(self.steps.fork_original, current)
                    cost = cost.plus(seconds, peak)
                else:
                    model = held.pop()
                model, seconds, peak = self.timed(self.steps.apply, model, current)
            except self.caught as error:  # type: ignore[misc]
                self.fail(node, error)
                return
            cost = cost.plus(seconds, peak)
            held.append(model)
            del model
        self.visit(node, held, cost, root)

    def visit(self, node: Node, held: list[M], cost: Cost, root: Node) -> None:
        """Save the variants ending at ``node``, then make its children depth first."""
        for index in node.ending:
            try:
                self.made[index] = self.steps.save(held[0], index, cost)
            except self.caught as error:  # type: ignore[misc]
                self.made[index] = Failed(error)
        children = list(node.children.values())
        for position, child in enumerate(children):
            self.start(child, held, position == len(children) - 1, cost, root)


def walk(root: Node, steps: TreeSteps[M, S], count: int, unsupported_fails: bool = True) -> list[S | Failed]:
    """Every variant made (``count`` of them, in order) by one depth-first walk of ``root``.
    ``unsupported_fails``: an ``UnsupportedError`` marks the variants under its step
    (:class:`Failed`) like a ``CompressionError``; else it ends the walk."""
    caught: tuple[type[Exception], ...] = (CompressionError, UnsupportedError) if unsupported_fails \
        else (CompressionError,)
    walker: _Walk[M, S] = _Walk(steps, caught)
    for index in root.ending:  # a variant without steps: the loaded model, forked and saved
        try:
            model, seconds, peak = walker.timed(steps.fork_original, root)
            walker.made[index] = steps.save(model, index, Cost(seconds, peak))
        except caught as error:
            walker.made[index] = Failed(error)  # type: ignore[arg-type]
    for child in root.children.values():
        walker.start(child, [], False, Cost(), root)
    return [walker.made[index] for index in range(count)]
