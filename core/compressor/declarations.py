"""What the installed backends declare about each technique, for code that has no backend
at hand: the parameter a bare value sets while a step is parsed (``prune 0.5``, before the
backend is known), the ``compressor run`` options that add steps, and the size of a step
whose own backend does not declare one.

Core knows a technique only from these declarations (:class:`compressor.specs.Technique`),
never from its name: a third party's technique gets a bare value and an option the same
way the built-in ones do. Where backends declare one technique differently, the first
backend by name that declares the thing wins, and a differing declaration is a warning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from compressor.models import Step
from compressor.specs import CliFlag, Technique

if TYPE_CHECKING:
    from compressor.plugins import PluginHost


def _host(host: PluginHost | None) -> PluginHost:
    if host is not None:
        return host
    from compressor.plugins import get_host

    return get_host()


def declared(technique: str, host: PluginHost | None = None) -> list[tuple[str, Technique]]:
    """Every installed backend's declaration of ``technique``: ``(backend, technique)`` by backend name."""
    return [(name, backend.techniques[technique]) for name, backend in _host(host).backends().items()
            if technique in backend.techniques]


def _warn(host: PluginHost, warning: str) -> None:
    if warning not in host.warnings:
        host.warnings.append(warning)


def positional_param(technique: str, host: PluginHost | None = None) -> str | None:
    """The parameter a bare value of ``technique`` sets (``prune 0.5`` -> sparsity), as the
    installed backends declare it; None when none declares one."""
    host = _host(host)
    found = [(backend, declaration.positional) for backend, declaration in declared(technique, host)
             if declaration.positional]
    if not found:
        return None
    (first_backend, chosen), *others = found
    for backend, other in others:
        if other != chosen:
            _warn(host, f"warning: backends {first_backend!r} and {backend!r} give a bare value of {technique} "
                        f"to different parameters ({chosen} and {other}); steps use {chosen}")
    return chosen


def size_factor(step: Step, techniques: Mapping[str, Technique] | None = None,
                host: PluginHost | None = None) -> float:
    """The share of the input's bytes ``step`` leaves: as ``techniques`` (the step's own
    backend's) declare it, else the largest share an installed backend declares (the
    estimate errs on the large side), else 1.0."""
    own = techniques.get(step.technique) if techniques is not None else None
    if own is not None and (share := own.size_after(step.params)) is not None:
        return share
    shares = [share for _, declaration in declared(step.technique, host)
              if (share := declaration.size_after(step.params)) is not None]
    return max(shares, default=1.0)


def flag_techniques(host: PluginHost | None = None, taken: frozenset[str] = frozenset()) -> list[Technique]:
    """The techniques that have a ``compressor run`` option, one declaration each (the first
    backend's by name), in the order the options are listed: those that make one variant per
    value first, then the others in the order their steps run. An option spelt like one in
    ``taken`` (core's own) or like an earlier technique's is left out with a warning."""
    host = _host(host)
    chosen: dict[str, tuple[str, Technique]] = {}
    for name, backend in host.backends().items():
        for technique in backend.techniques.values():
            if technique.cli is None:
                continue
            if technique.name not in chosen:
                chosen[technique.name] = (name, technique)
                continue
            first, declaration = chosen[technique.name]
            assert declaration.cli is not None
            if technique.cli.spellings != declaration.cli.spellings:
                _warn(host, f"warning: backend {name!r} declares {'/'.join(technique.cli.spellings)} for "
                            f"{technique.name}, backend {first!r} {'/'.join(declaration.cli.spellings)}; "
                            f"{'/'.join(declaration.cli.spellings)} is used")
    spelt: dict[str, str] = {spelling: "compressor run" for spelling in taken}
    techniques = []
    for name, technique in sorted(chosen.values(), key=lambda entry: _listed(entry[1])):
        flag: CliFlag = technique.cli  # type: ignore[assignment]
        clash = next((spelling for spelling in flag.spellings if spelling in spelt), None)
        if clash is not None:
            _warn(host, f"warning: backend {name!r} declares {clash} for {technique.name}, which "
                        f"{spelt[clash]} already has; the option is left out")
            continue
        spelt.update(dict.fromkeys(flag.spellings, f"technique {technique.name!r}"))
        techniques.append(technique)
    return techniques


def asked_for(host: PluginHost | None = None) -> str:
    """What a run with nothing to do should ask for: ``--quantize, --prune, --pq or a --recipe``."""
    options = [technique.cli.name for technique in flag_techniques(host) if technique.cli is not None]
    return ", ".join(options) + (" or " if options else "") + "a --recipe"


def _listed(technique: Technique) -> tuple[bool, int]:
    return (not (technique.cli is not None and technique.cli.repeat), technique.order)


def modes_help(technique: str, host: PluginHost | None = None) -> str:
    """Every backend's modes of ``technique``, known modes first (the shared vocabulary's
    order), with the backends that have each where not all of them do."""
    from compressor.specs import QUANTIZE_MODES

    owners: dict[str, list[str]] = {}
    for backend, declaration in declared(technique, host):
        for mode in declaration.modes:
            owners.setdefault(mode, []).append(backend)
    order = [mode for mode in QUANTIZE_MODES if mode in owners] + sorted(set(owners) - set(QUANTIZE_MODES))
    having = {name for names in owners.values() for name in names}
    return ", ".join(mode if set(owners[mode]) == having else f"{mode} ({', '.join(owners[mode])})"
                     for mode in order)
