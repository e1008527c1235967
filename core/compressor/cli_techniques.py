"""``compressor run``'s technique options (``-q MODE``, ``--prune S``, ``--pq``), made from
the installed backends' declarations (``Technique.cli``) when the command parses its
arguments or shows its help: a third party's technique gets its option as the built-in
ones do, and building the command loads no plugin."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from compressor.clibase import FiniteFloatRange
from compressor.declarations import flag_techniques, modes_help
from compressor.specs import CliFlag, Technique

#: ``ctx.meta`` keys: the options made for a command, and the values they were given.
_OPTIONS, _GIVEN = "compressor.technique_options", "compressor.technique_values"


class TechniqueOption(click.Option):
    """The option of one technique; its value goes to ``ctx.meta`` (:func:`given_techniques`)."""

    def __init__(self, technique: Technique) -> None:
        flag = technique.cli
        assert flag is not None, technique.name
        self.technique = technique
        if flag.takes_value:
            super().__init__(list(flag.spellings), multiple=flag.repeat, metavar=flag.metavar,
                             type=_value_type(flag), help=flag.help, expose_value=False, callback=self.remember)
        else:
            super().__init__(list(flag.spellings), is_flag=True, help=flag.help, expose_value=False,
                             callback=self.remember)

    def remember(self, ctx: click.Context, param: click.Parameter, value: Any) -> None:
        ctx.meta.setdefault(_GIVEN, {})[self.technique.name] = value

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        """The help with ``{modes}`` replaced by the modes the installed backends declare."""
        template = self.help or ""
        if "{modes}" not in template:
            return super().get_help_record(ctx)
        try:
            self.help = template.replace("{modes}", modes_help(self.technique.name) or "the backend's modes")
            return super().get_help_record(ctx)
        finally:
            self.help = template


def _value_type(flag: CliFlag) -> click.ParamType:
    bounded = flag.minimum is not None or flag.maximum is not None
    if flag.type is float:
        return FiniteFloatRange(flag.minimum, flag.maximum, min_open=flag.exclusive, max_open=flag.exclusive)
    if flag.type is int:
        if not bounded:
            return click.INT
        low = None if flag.minimum is None else int(flag.minimum)
        high = None if flag.maximum is None else int(flag.maximum)
        return click.IntRange(low, high, min_open=flag.exclusive, max_open=flag.exclusive)
    return click.STRING


class TechniqueCommand(click.Command):
    """A command whose technique options follow its ``--backend`` option."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        if _OPTIONS not in ctx.meta:
            taken = frozenset(opt for param in params for opt in (*param.opts, *param.secondary_opts))
            ctx.meta[_OPTIONS] = [TechniqueOption(technique) for technique in flag_techniques(taken=taken)]
        after = next((index + 1 for index, param in enumerate(params) if param.name == "backend"), len(params))
        return [*params[:after], *ctx.meta[_OPTIONS], *params[after:]]


def given_techniques(ctx: click.Context) -> list[tuple[Technique, Sequence[Any]]]:
    """What the technique options were given: ``(technique, values)`` each, a switch's value None."""
    given = ctx.meta.get(_GIVEN, {})
    chosen = []
    for option in ctx.meta.get(_OPTIONS, ()):
        value = given.get(option.technique.name)
        if option.is_flag:
            values: Sequence[Any] = [None] if value else []
        elif option.multiple:
            values = list(value or ())
        else:
            values = [] if value is None else [value]
        if values:
            chosen.append((option.technique, values))
    return chosen
