"""``compressor cache info|clear``, and ``--no-cache`` on ``compressor run`` and ``compressor search``
(see :mod:`compressor.cache`)."""

from __future__ import annotations

import click

from compressor import cache


@click.group(name="cache")
def cache_command() -> None:
    """The cache of artifacts and measurements reused across runs.

    Its folder: $COMPRESSOR_CACHE_DIR, else $XDG_CACHE_HOME/compressor, else
    ~/.cache/compressor. Its size: at most $COMPRESSOR_CACHE_MAX_BYTES (default
    4 GiB), least recently used first out. COMPRESSOR_CACHE=off, or `--no-cache`
    on `compressor run` and `compressor search`, turns it off.
    """


@cache_command.command()
def info() -> None:
    """Where the cache is, what it holds and its size limit."""
    store = cache.Cache()
    entries = store.listing()
    total = sum(size for _, size, _ in entries)
    state = "on" if cache.enabled() else f"off ({cache.CACHE_SWITCH_VARIABLE}=off)"
    click.echo(f"cache: {store.root} ({state})")
    click.echo(f"entries: {len(entries)}, {total / 1e6:.1f} MB of at most {cache.max_bytes() / 1e6:.1f} MB")


@cache_command.command()
def clear() -> None:
    """Remove every entry."""
    store = cache.Cache()
    count = len(store.listing())
    freed = store.clear()
    click.echo(f"removed {count} entries, {freed / 1e6:.1f} MB, from {store.root}")


def _no_cache(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    cache.disable(value)


#: The commands that use the cache, and so take ``--no-cache``.
USERS = ("run", "search")


def register(cli: click.Group) -> None:
    """The ``cache`` command, and ``--no-cache`` on each command that uses the cache."""
    cli.add_command(cache_command)
    for name in USERS:
        cli.commands[name].params.append(click.Option(
            ["--no-cache"], is_flag=True, expose_value=False, callback=_no_cache,
            help="Neither reuse nor keep artifacts and measurements of earlier runs."))
