"""The backend's hooks that load: the model, each variant's starting point, the data files.

Each call is limited to the backend's own plugin (and plugins that declare no backend);
a framework missing inside the plugin is an install hint (:func:`compressor.plugins.plugin_errors`).
"""

from __future__ import annotations

from pathlib import Path

from compressor.errors import InvalidInputError, UsageError
from compressor.models import Context, Dataset, Model
from compressor.plugins import PluginHost, plugin_errors
from compressor.specs import Backend


def load_model(host: PluginHost, backend: Backend, path: Path, context: Context) -> Model:
    with plugin_errors(backend):
        model = host.hook_for(backend.name, "compressor_load")(
            path=path, backend=backend.name, context=context
        )
    if model is None:
        raise InvalidInputError(f"backend {backend.name!r} cannot read this file", path)
    return model


def fork_model(
    host: PluginHost, backend: Backend, original: Model, path: Path, context: Context
) -> Model:
    """A variant's starting point: the backend's fork of the loaded model, or a fresh load."""
    with plugin_errors(backend):
        forked = host.hook_for(backend.name, "compressor_fork")(model=original, context=context)
    return forked if forked is not None else load_model(host, backend, path, context)


def load_data(
    host: PluginHost, backend: Backend, path: Path | None, purpose: str, model: Model,
    limit: int | None = None, context: Context | None = None,
) -> Dataset | None:
    if path is None:
        return None
    if not path.exists():
        raise InvalidInputError("data file not found", path)
    with plugin_errors(backend):
        dataset = host.hook_for(backend.name, "compressor_load_data")(
            path=path, purpose=purpose, inputs=model.inputs, backend=backend.name, limit=limit,
            model_path=model.source, context=context,
        )
    if dataset is None:
        raise UsageError(f"backend {backend.name!r} cannot read {purpose} data in this format", path)
    return dataset
