"""Plugin discovery and the backend registry.

Plugins come from the ``compressor`` entry-point group (built-in backends are
registered that way too) plus core's own generic plugins. A plugin that fails
to import becomes a one-line warning, never a crash.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from compressor import hookspecs
from compressor.errors import CompressorError, UnsupportedError, UsageError, first_line
from compressor.specs import Backend

ENTRY_POINT_GROUP = "compressor"
#: ``COMPRESSOR_LOAD_PLUGINS=onnx,fasttext`` loads only those entry points; empty loads none.
LOAD_PLUGINS_ENV = "COMPRESSOR_LOAD_PLUGINS"
CORE_PLUGIN_MODULES = ("compressor.builtin",)


class PluginConflictError(CompressorError):
    """Two plugins claim the same backend name."""

    exit_code = UnsupportedError.exit_code


@dataclass
class PluginInfo:
    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    hooks: list[str] = field(default_factory=list)


class PluginHost:
    """A pluggy manager plus what compressor knows about each plugin."""

    def __init__(self, load_entry_points: bool = True, only: Collection[str] | None = None) -> None:
        """``only``: load just these entry points (the measuring process loads one plugin)."""
        self.manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.manager.add_hookspecs(hookspecs)
        self.warnings: list[str] = []
        self._distributions: dict[str, tuple[str, str]] = {}
        self._extra_modules: list[str] = []
        self._backends: dict[str, Backend] | None = None
        for module_name in CORE_PLUGIN_MODULES:
            self.manager.register(importlib.import_module(module_name), name=module_name)
        if load_entry_points:
            self._load_entry_points(only)

    @property
    def hook(self) -> Any:
        return self.manager.hook

    def _load_entry_points(self, only: Collection[str] | None = None) -> None:
        wanted_env = os.environ.get(LOAD_PLUGINS_ENV)
        wanted = None if wanted_env is None else {n.strip() for n in wanted_env.split(",") if n.strip()}
        if only is not None:
            wanted = set(only) if wanted is None else wanted & set(only)
        for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if wanted is not None and entry_point.name not in wanted:
                continue
            if self.manager.get_plugin(entry_point.name) is not None:
                continue
            try:
                plugin = entry_point.load()
                unknown = unknown_hooks(plugin)
                if unknown:
                    self.warnings.append(f"warning: plugin {entry_point.name!r} {unknown}; skipped")
                    continue
                self.manager.register(plugin, name=entry_point.name)
                self._warn_deprecated(plugin, entry_point.name)
            except KeyboardInterrupt:
                raise
            except BaseException as error:  # noqa: BLE001 - a plugin bug (even sys.exit) must not kill the CLI
                detail = str(error).splitlines()[0] if str(error) else ""
                if isinstance(error, SystemExit):
                    detail = f"it called sys.exit({error.code!r}) while being imported"
                self.warnings.append(
                    f"warning: plugin {entry_point.name!r} failed to load "
                    f"({type(error).__name__}{': ' + detail if detail else ''}); skipped"
                )
                continue
            if entry_point.dist is not None:
                self._distributions[entry_point.name] = (
                    entry_point.dist.name,
                    entry_point.dist.version,
                )

    def register(self, plugin: ModuleType | object, name: str | None = None) -> None:
        """Register a plugin in-process (tests, scripts). Module plugins also reach
        the measurement subprocesses. A misspelt hook is an error here."""
        unknown = unknown_hooks(plugin)
        if unknown:
            raise pluggy.PluginValidationError(plugin, f"plugin {name or plugin!r} {unknown}")
        self.manager.register(plugin, name=name)
        self._warn_deprecated(plugin, name or str(getattr(plugin, "__name__", plugin)))
        if isinstance(plugin, ModuleType):
            self._extra_modules.append(plugin.__name__)
        self._backends = None

    def _warn_deprecated(self, plugin: object, name: str) -> None:
        """A line for the user about each deprecated hook ``plugin`` implements."""
        marker = f"{hookspecs.PROJECT_NAME}_impl"
        if hasattr(getattr(plugin, "compressor_measure", None), marker):
            why = hookspecs.MEASURE_DEPRECATION.replace(" is deprecated", ", which is deprecated", 1)
            self.warnings.append(f"warning: plugin {name!r} implements {why}")

    def unregister(self, name: str) -> None:
        plugin = self.manager.unregister(name=name)
        if isinstance(plugin, ModuleType) and plugin.__name__ in self._extra_modules:
            self._extra_modules.remove(plugin.__name__)
        self._backends = None

    @property
    def extra_modules(self) -> list[str]:
        return list(self._extra_modules)

    def plugins(self) -> list[PluginInfo]:
        infos = []
        for name, plugin in sorted(self.manager.list_name_plugin()):
            distribution, version = self._distributions.get(name, (None, None))
            module = getattr(plugin, "__name__", type(plugin).__name__)
            if distribution is None and module.split(".")[0] == "compressor":
                from compressor.version import __version__

                distribution, version = "compressor", __version__
            hooks = sorted(c.name for c in self.manager.get_hookcallers(plugin) or [])
            infos.append(PluginInfo(name, module, distribution, version, hooks))
        return infos

    def backends(self) -> dict[str, Backend]:
        """Every registered backend by name. Two plugins claiming one name is an error."""
        if self._backends is not None:
            return self._backends
        backends: dict[str, Backend] = {}
        for impl in self.manager.hook.compressor_backends.get_hookimpls():
            try:
                declared = list(impl.function() or ())
            except Exception as error:  # noqa: BLE001
                self.warnings.append(
                    f"warning: plugin {impl.plugin_name!r} failed to declare its backends "
                    f"({type(error).__name__}: {error}); skipped"
                )
                continue
            wrong = [item for item in declared if not isinstance(item, Backend)]
            if wrong:
                self.warnings.append(
                    f"warning: plugin {impl.plugin_name!r} declared {type(wrong[0]).__name__} "
                    "objects instead of compressor.Backend; skipped"
                )
                continue
            for backend in declared:
                if backend.name in backends:
                    raise PluginConflictError(
                        f"backend {backend.name!r} is registered by two plugins: "
                        f"{backends[backend.name].plugin_name!r} and {impl.plugin_name!r}; "
                        f"uninstall one or restrict with {LOAD_PLUGINS_ENV}"
                    )
                backends[backend.name] = replace(backend, plugin_name=impl.plugin_name)
        self._backends = dict(sorted(backends.items()))
        return self._backends

    def backend(self, name: str) -> Backend:
        backends = self.backends()
        if name not in backends:
            raise UnsupportedError(
                f"unknown backend {name!r}; available: {', '.join(backends) or 'none'}"
            )
        return backends[name]

    def identify(self, path: Path) -> str | None:
        """The backend that claims ``path``. A plugin that raises or names an unknown
        backend is skipped with a warning; two plugins claiming one file is an error."""
        claims: dict[str, str] = {}
        known = self.backends()
        for impl in reversed(self.manager.hook.compressor_identify.get_hookimpls()):
            try:
                claimed = impl.function(path=path)
            except Exception as error:  # noqa: BLE001 - a plugin bug must not stop the run
                self.warnings.append(
                    f"warning: plugin {impl.plugin_name!r} failed to identify {path.name} "
                    f"({type(error).__name__}: {error}); skipped"
                )
                continue
            if claimed is None:
                continue
            if not isinstance(claimed, str) or claimed not in known:
                self.warnings.append(
                    f"warning: plugin {impl.plugin_name!r} identified {path.name} as {claimed!r}, "
                    "which is not a registered backend; skipped"
                )
                continue
            claims.setdefault(claimed, impl.plugin_name)
        if len(claims) > 1:
            named = " and ".join(f"{backend!r} (plugin {plugin!r})" for backend, plugin in claims.items())
            raise UsageError(f"both {named} read this file; choose one with --backend", path)
        return next(iter(claims), None)

    def hook_for(self, backend_name: str, hook_name: str) -> Any:
        """A caller for ``hook_name`` limited to the backend's own plugin and
        plugins that declare no backend (generic measurers, core)."""
        owner = self.backend(backend_name).plugin_name
        others = {b.plugin_name for b in self.backends().values()} - {owner}
        remove = [self.manager.get_plugin(name) for name in others]
        return self.manager.subset_hook_caller(hook_name, [p for p in remove if p is not None])

    def loaders(self, backend_name: str | None) -> Any:
        """The load hook: every plugin when ``backend_name`` is None, else just that backend's."""
        if backend_name is None:
            return self.manager.hook.compressor_load
        return self.hook_for(backend_name, "compressor_load")


def unknown_hooks(plugin: object) -> str | None:
    """What is wrong when ``plugin`` implements a hook compressor does not have
    (a misspelling that would otherwise never be called), else None."""
    import difflib

    known = [name for name in dir(hookspecs) if name.startswith(f"{hookspecs.PROJECT_NAME}_")]
    marker = f"{hookspecs.PROJECT_NAME}_impl"
    wrong = [name for name in dir(plugin)
             if hasattr(getattr(plugin, name, None), marker) and name not in known]
    if not wrong:
        return None
    name = wrong[0]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"implements {name}, which is not a compressor hook{hint}"


@contextmanager
def plugin_errors(backend: Backend | None) -> Iterator[None]:
    """Turn a missing or broken framework inside a plugin into an install hint."""
    name = f"backend {backend.name!r}" if backend else "a plugin"
    try:
        yield
    except ModuleNotFoundError as error:
        hint = f"; install it with: {backend.install_hint()}" if backend else ""
        raise UnsupportedError(f"{name} needs the module {error.name!r}{hint}") from None
    except ImportError as error:
        # Installed but unusable: a broken wheel, a missing shared library, too little memory.
        raise UnsupportedError(
            f"{name} could not import {error.name or 'its framework'!r} ({first_line(error)})"
        ) from None


_host: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide plugin host, created on first use."""
    global _host
    if _host is None:
        _host = PluginHost()
    return _host


def reset_host() -> None:
    global _host
    _host = None


def print_warnings(host: PluginHost) -> None:
    for warning in dict.fromkeys(host.warnings):
        print(warning, file=sys.stderr)
