"""``compressor demo``: every installed backend compresses its own small sample model."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from compressor.errors import CompressionError, CompressorError, UnsupportedError, first_line
from compressor.models import MeasureSettings, ProgressCallback, SampleModel
from compressor.plugins import PluginHost, plugin_errors
from compressor.recipes import variants_from_strings
from compressor.report import render_table
from compressor.run_request import RunRequest
from compressor.runner import run


def sample_models(host: PluginHost, folder: Path, only: Sequence[str],
                  broken: dict[str, str] | None = None) -> list[SampleModel]:
    """Each installed backend's samples. A backend whose framework is broken (an
    impostor package, a failing import) goes into ``broken`` with the reason."""
    samples: list[SampleModel] = []
    broken = {} if broken is None else broken
    for backend in host.backends().values():
        if only and backend.name not in only:
            continue
        if not backend.is_installed():
            continue
        reason = backend.broken_reason()
        if reason:
            broken[backend.name] = reason
            continue
        target = folder / backend.name
        target.mkdir(parents=True, exist_ok=True)
        try:
            with plugin_errors(backend):
                for produced in host.hook_for(backend.name, "compressor_sample_models")(directory=target):
                    samples.extend(s for s in produced or () if s.backend == backend.name)
        except Exception as error:  # noqa: BLE001 - one backend's broken framework must not stop the others
            broken[backend.name] = f"{type(error).__name__}: {first_line(error)}"
    return samples


def no_sample_reason(host: PluginHost, only: Sequence[str]) -> str:
    """Why no sample was made: the chosen backends have none (say which have one), or none is installed."""
    implementing = {impl.plugin_name for impl in host.manager.hook.compressor_sample_models.get_hookimpls()}
    with_samples = [backend.name for backend in host.backends().values()
                    if backend.plugin_name in implementing and backend.is_installed()]
    chosen = [name for name in only if host.backend(name).is_installed() and name not in with_samples]
    if chosen:
        names = ", ".join(chosen)
        other = (f"; try compressor demo --backend {with_samples[0]} (backends with one: {', '.join(with_samples)})"
                 if with_samples else "")
        return (f"the {names} backend{'s have' if len(chosen) > 1 else ' has'} no demo sample model{other}, "
                f"or run yours: compressor run MODEL --backend {chosen[0]} -o out")
    return "no installed backend has a sample model; install one, e.g. pip install 'compressor[onnx]'"


def run_demo(
    host: PluginHost,
    out: Path | None,
    only: Sequence[str],
    settings: MeasureSettings,
    progress: ProgressCallback,
    end_progress: Callable[[], None],
    echo: Callable[[str], None],
) -> None:
    unknown = [name for name in only if name not in host.backends()]
    if unknown:
        host.backend(unknown[0])  # raises with the list of known backends
    missing = [b for b in host.backends().values() if not b.is_installed() and (not only or b.name in only)]
    with tempfile.TemporaryDirectory(prefix="compressor-demo-") as scratch:
        root = out.absolute() if out else Path(scratch)
        broken: dict[str, str] = {}
        samples = sample_models(host, root / "samples", only, broken)
        if not samples and broken:
            raise UnsupportedError("no backend could make its sample model: " + "; ".join(
                f"{name} is installed but broken: {reason}" for name, reason in broken.items()))
        if not samples:
            raise UnsupportedError(no_sample_reason(host, only))
        failures = []
        for sample in samples:
            echo(f"\n== {sample.backend}: {sample.description or sample.name}")
            request = RunRequest(
                model=sample.path,
                out=root / "runs" / f"{sample.backend}-{sample.name}",
                backend=sample.backend,
                variants=variants_from_strings(sample.variants),
                settings=dict(sample.options),
                data=sample.eval_data,
                train_data=sample.train_data,
                calibration_data=sample.calibration_data,
                force=True,
                measure=settings,
            )
            try:
                report = run(request, host, progress)
            except UnsupportedError as error:
                end_progress()
                broken[sample.backend] = error.message
                continue
            except CompressorError as error:
                end_progress()
                echo(f"error: {error}")
                failures.append(f"{sample.backend}/{sample.name}")
                continue
            end_progress()
            echo(render_table(report))
        for backend in missing:
            echo(f"\n({backend.name} skipped: {backend.install_hint()})")
        made = {sample.backend for sample in samples}
        for name in only:
            if name not in made and name not in broken and host.backend(name).is_installed():
                echo(f"\n({name} skipped: it has no demo sample model; run yours: "
                     f"compressor run MODEL --backend {name} -o out)")
        for name, reason in broken.items():
            echo(f"\n({name} skipped: installed but broken: {reason})")
        if out:
            echo(f"\nsamples, artifacts and reports are in {root}")
        else:
            echo("\n(pass --out DIR to keep the sample models, artifacts and reports)")
    if failures:
        end_progress()
        raise CompressionError(f"demo failed for: {', '.join(failures)}")
