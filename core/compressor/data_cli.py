"""``compressor data MODEL TEXT -o DATA.npz``: text tokenized for a model, once, as a run does it.

A run given ``--data sentences.txt`` tokenizes the text with the model's tokenizer
(the backend's ``compressor_load_data``; the onnx and torch backends read ``.txt`` and
``.jsonl``) into arrays named like the model's inputs. This command loads the model
the same way and writes those very arrays, labels in ``y``, as an ``.npz``: the file a
run then reads as it is, for users who want to fix the tokenization once.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import click

from compressor.errors import UsageError
from compressor.models import Dataset

if TYPE_CHECKING:
    from compressor.plugins import PluginHost

_path = click.Path(path_type=Path)
PURPOSES = ("eval", "calibration", "train")


def write_text_data(model: Path, text: Path, out: Path, *, backend: str | None = None,
                    settings: dict[str, str] | None = None, trust: bool = False,
                    max_examples: int | None = None, purpose: str = "eval", force: bool = False,
                    host: PluginHost | None = None) -> Dataset:
    """Tokenize ``text`` for ``model`` as ``compressor run`` would and write the arrays to
    ``out`` (an ``.npz``); returns the dataset (its ``notes`` say how it was tokenized)."""
    from compressor import scratch
    from compressor.backend_resolution import resolve_backend
    from compressor.feeding import with_batch_axes
    from compressor.loading import load_data, load_model
    from compressor.models import Context
    from compressor.outputs import atomic_write
    from compressor.plugins import get_host
    from compressor.validation import apply_settings

    model, text, out = Path(model), Path(text), Path(out)
    _check_paths(model, text, out, force)
    host = host or get_host()
    chosen = resolve_backend(host, model, backend)
    _, options = apply_settings(chosen, [], settings or {})
    with scratch.scratch_folder(scratch.WORK) as workdir:
        context = Context(options=options, trust=trust, workdir=workdir)
        loaded = load_model(host, chosen, model, context)
        loaded.inputs = with_batch_axes(loaded.inputs, options)
        dataset = load_data(host, chosen, text, purpose, loaded, max_examples, context)
        if dataset is None or dataset.prepared is None:
            raise UsageError(f"is not text the {chosen.name} backend tokenizes (.txt, .jsonl): "
                             "nothing to write", text)
        prepared = dataset.prepared
        atomic_write(out, lambda temporary: shutil.copyfile(prepared, temporary))
    return dataset


def _check_paths(model: Path, text: Path, out: Path, force: bool) -> None:
    if out.suffix.lower() != ".npz":
        raise UsageError("the output must be an .npz file (compressor run reads it with --data)", out)
    if not text.is_file():
        raise UsageError("no such text file", text)
    if not model.exists():
        raise UsageError("no such model file or folder", model)
    if out.is_dir():
        raise UsageError("is a folder; name the .npz file to write", out)
    if not out.parent.is_dir():
        raise UsageError("the folder to write into does not exist", out.parent)
    resolved = out.resolve()
    if resolved in (text.resolve(), model.resolve()) or resolved.is_relative_to(model.resolve()):
        raise UsageError("would write over or into an input", out)
    if (out.exists() or out.is_symlink()) and not force:
        raise UsageError("exists; pass --force to replace it", out)


@click.command("data")
@click.argument("model", type=_path)
@click.argument("text", type=_path)
@click.option("--out", "-o", type=_path, required=True, help="The .npz to write.")
@click.option("--backend", "-b", help="Backend whose tokenizing to use (default: recognised from the model).")
@click.option("--set", "set_pairs", multiple=True, metavar="KEY=VALUE",
              help="A backend option: max_length=N, tokenizer=FOLDER, input_shape=...")
@click.option("--purpose", type=click.Choice(PURPOSES), default="eval", show_default=True,
              help="What the data is for (as --data, --calibration-data or --train-data).")
@click.option("--max-examples", type=click.IntRange(1), default=None, help="Only the first N examples.")
@click.option("--trust", is_flag=True, help="Allow model formats that execute code when loaded.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
def data(model: Path, text: Path, out: Path, backend: str | None, set_pairs: tuple[str, ...], purpose: str,
         max_examples: int | None, trust: bool, force: bool) -> None:
    """Tokenize TEXT (.txt: one example a line; .jsonl: {"text", "label"}) for MODEL into an .npz.

    The arrays are exactly those `compressor run MODEL --data TEXT` measures on.
    """
    from compressor.clibase import parse_settings, plugin_host

    dataset = write_text_data(model, text, out, backend=backend, settings=parse_settings(set_pairs),
                              trust=trust, max_examples=max_examples, purpose=purpose, force=force,
                              host=plugin_host())
    for note in dataset.notes:
        click.echo(note)
    arrays = ", ".join(f"{name} {tuple(array.shape)}" for name, array in dataset.features.items())
    labels = "" if dataset.labels is None else f", y {tuple(dataset.labels.shape)}"
    click.echo(f"wrote {out}: {arrays}{labels}")
