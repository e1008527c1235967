"""Making and measuring variants on Ray (``--executor ray``): a local Ray started for
the run, or an existing cluster (``--ray-address auto`` or ``ray://host:10001``).

* **Make** (load, compress, save) runs as one task per variant, asking for as many
  CPUs as the measuring threads; each task loads the model itself (workers share
  no memory) and sends the artifact's files back to the driver.
* **Measure** runs as one task per variant that needs the custom resource
  ``compressor_measure``, of which every node has one: at most one measurement
  per node at a time, so latencies are not taken while another measurement
  competes for the same cores. A local Ray gets that resource when it starts;
  start the nodes of a cluster with ``--resources '{"compressor_measure": 1}'``.
* Every measurement records the node and CPU model it ran on; the report says
  when the variants were measured on different CPU models.
* A task that fails or whose worker is lost fails that variant only.
* Data and model paths must be readable at the same path on every node (a
  shared filesystem); artifacts come back through Ray's object store.
* With the cache across runs (:mod:`compressor.run_cache`), the driver looks every
  variant up first: one whose artifact the cache holds is not made on the cluster, one
  whose measurement it holds too is not measured there (and when nothing is left to do,
  Ray is not started). What the cluster makes is kept by the driver; what it measures
  is kept only when the worker's machine is the driver's (the key is the driver's).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from compressor import run_cache, scratch
from compressor.errors import CompressorError, UnsupportedError, first_line
from compressor.models import Artifact, ProgressCallback, TensorSpec
from compressor.plugins import PluginHost
from compressor.recipes import Variant
from compressor.report import VariantResult
from compressor.run_request import RunRequest
from compressor.session import Session
from compressor.worker import MeasuredArtifact

MEASURE_RESOURCE = "compressor_measure"


@dataclass
class Made:
    result: VariantResult
    files: dict[str, bytes]
    backend: str = ""
    format: str = ""
    main: str = ""
    node: str = ""


def _ray() -> Any:  # the ray module
    try:
        import ray
    except ModuleNotFoundError:
        raise UnsupportedError("--executor ray needs Ray: pip install 'compressor[ray]'") from None
    return ray


class RayExecutor:
    """Ray started (or joined) for one run or search; ``close`` shuts a local one down.

    ``timeout``: seconds to reach a cluster at ``address`` (``--ray-timeout``, default
    :data:`compressor.ray_cluster.DEFAULT_TIMEOUT`); see :mod:`compressor.ray_cluster`."""

    def __init__(self, address: str | None, threads: int, extra_modules: Sequence[str],
                 timeout: float | None = None) -> None:
        ray = _ray()
        from compressor import ray_cluster
        from compressor.children import import_path

        self.ray, self.threads, self.extra_modules = ray, threads, list(extra_modules)
        self._local: ray_cluster.LocalRay | None = None
        self._joined = False
        if ray.is_initialized():  # the caller's own Ray: used as it is, left running
            return
        runtime_env = {"env_vars": {"PYTHONPATH": import_path(), "ORT_DISABLE_TELEMETRY": "1",
                                    "TF_CPP_MIN_LOG_LEVEL": "2"}}
        self._local = ray_cluster.init(
            ray, address, ray_cluster.DEFAULT_TIMEOUT if timeout is None else timeout,
            {"log_to_driver": False, "configure_logging": False, "runtime_env": runtime_env},
            {"resources": {MEASURE_RESOURCE: 1}, "include_dashboard": False})
        self._joined = self._local is None
        if not any(node.get("Resources", {}).get(MEASURE_RESOURCE) for node in ray.nodes()):
            self.close()
            raise UnsupportedError(f"no Ray node offers the resource {MEASURE_RESOURCE!r}; start the nodes "
                                   f"with --resources '{{\"{MEASURE_RESOURCE}\": 1}}'")

    @property
    def started(self) -> bool:
        """Whether this run started the Ray it uses (and stops it in :meth:`close`)."""
        return self._local is not None

    def close(self) -> None:
        from compressor import ray_cluster

        local, self._local = self._local, None
        if local is not None:
            ray_cluster.stop(self.ray, local)
        elif self._joined:  # leave the cluster, which runs on
            self._joined = False
            with ray_cluster.quiet_ray():
                self.ray.shutdown()

    def make(self, request: RunRequest, variants: Sequence[Variant]) -> list[Made | CompressorError]:
        """Every variant made on the cluster, in parallel."""
        task = self.ray.remote(_make_remote).options(num_cpus=self.threads, max_retries=0,
                                                      scheduling_strategy="SPREAD")
        futures = [task.remote(request, variant, self.extra_modules) for variant in variants]
        return [self._get(future) for future in futures]

    @property
    def measuring_slots(self) -> int:
        """How many measurements may run at once (one per node offering the resource)."""
        return int(sum(node.get("Resources", {}).get(MEASURE_RESOURCE, 0)
                       for node in self.ray.nodes() if node.get("Alive")))

    def measure(self, request: RunRequest, made: Sequence[Made],
                inputs: Sequence[TensorSpec]) -> list[MeasuredArtifact | CompressorError]:
        """Every artifact measured on the cluster, at most one at a time per node."""
        task = self.ray.remote(_measure_remote).options(
            num_cpus=self.threads, resources={MEASURE_RESOURCE: 1}, max_retries=0, scheduling_strategy="SPREAD")
        futures = [task.remote(request, item, list(inputs), self.extra_modules) for item in made]
        return [self._get(future) for future in futures]

    def _get(self, future: Any) -> Any:  # a Ray ObjectRef, to what its task returned
        try:
            return self.ray.get(future)
        except Exception as error:  # noqa: BLE001 - RayTaskError, WorkerCrashedError, NodeDiedError...
            cause = getattr(error, "cause", None)
            if isinstance(cause, CompressorError):
                return cause
            return CompressorError(f"the Ray task failed ({type(error).__name__}: {first_line(error)})")


def artifact_bytes(artifact: Artifact) -> dict[str, bytes]:
    """Every file of ``artifact`` by its name; a folder's files by ``folder/relative/path``."""
    folder = artifact.path.parent  # side files lie beside the artifact
    return {file.relative_to(folder).as_posix(): file.read_bytes() for file in artifact.plain_files()}


def stage(made: Made, staging: Path) -> Artifact:
    """Write a remotely made artifact's files into the driver's staging folder."""
    staging.parent.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name, data in made.files.items():
        parts = Path(name).parts
        if not parts or ".." in parts or Path(name).is_absolute():
            raise CompressorError(f"a worker sent a file named {name!r} outside the artifact")
        path = staging.parent / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        top = staging.parent / parts[0]  # a folder artifact's folder, once
        if top not in paths:
            paths.append(top)
    main = staging.parent / made.main
    return Artifact(made.backend, main, made.format, tuple(p for p in paths if p != main))


def _register(modules: Sequence[str]) -> PluginHost:
    import importlib

    from compressor.plugins import get_host

    host = get_host()
    for name in modules:
        module = importlib.import_module(name)
        if host.manager.get_plugin(name) is None and not host.manager.is_registered(module):
            host.register(module, name=name)
    return host


def _node() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


def _make_remote(request: RunRequest, variant: Variant, modules: Sequence[str]) -> Made:
    """On a worker: load the model, make one variant, return its files."""
    host = _register(modules)
    with scratch.scratch_folder(scratch.RAY_MAKE) as folder:
        local = replace(request, out=folder / "out", force=True, check_space=False)
        with Session(local, host, lambda message, fraction: None) as session:
            # Validated by the driver already: validating again would spell out defaults
            # (``bits=8``) that a local run leaves implicit, so the steps would differ.
            result, artifact = session.make(variant)
            if artifact is None:
                raise CompressorError(result.error or "compression failed")
            return Made(result, artifact_bytes(artifact), artifact.backend, artifact.format, artifact.path.name,
                        _node())


def _measure_remote(request: RunRequest, made: Made, inputs: Sequence[TensorSpec],
                    modules: Sequence[str]) -> MeasuredArtifact:
    """On a node's one measuring slot: write the artifact, measure it in a child process."""
    from compressor import environment
    from compressor.evaluation import measure_one

    host = _register(modules)
    with scratch.scratch_folder(scratch.RAY_MEASURE) as folder:
        artifact = stage(made, folder / "artifact")
        started = time.time()
        measured = measure_one(host, artifact, request.data, inputs, request.measure)
        measured.machine = run_cache.machine()
        measured.metrics["node"] = _node()
        measured.metrics["cpu_model"] = environment.describe(()).get("cpu", {}).get("model")
        # Wall-clock times, to check that one node never measured two artifacts at once.
        measured.metrics["measured_between"] = [started, time.time()]
        return measured


def made_from(result: VariantResult, artifact: Artifact) -> Made:
    """A locally made artifact, as a remote measurement takes it."""
    return Made(result, artifact_bytes(artifact), artifact.backend, artifact.format, artifact.path.name)


def run_on_ray(session: Session, variants: Sequence[Variant],
               progress: ProgressCallback) -> tuple[list[VariantResult], list[Artifact | None]]:
    """``compressor run --executor ray``: the original made here, every variant made on the
    cluster, all of them measured there; scored here against the original's measurement.
    What the cache holds is taken from it instead (Ray is started only when something is
    left to make or measure)."""
    from compressor.evaluation import check_reference, score, with_original_tasks
    from compressor.recipes import ORIGINAL
    from compressor.run_progress import begin

    request, original_model = session.request, session.original
    assert original_model is not None, "the session is open"
    cluster = _Cluster(request, session.host.extra_modules)
    try:
        original, original_artifact = session.make(Variant(ORIGINAL, ()))
        if original_artifact is None:
            raise CompressorError(f"could not convert the original model: {original.error}")
        cached = run_cache.open_any(request, session.backend, session.options,
                                    run_cache.plugin_identity(session.host, session.backend.plugin_name),
                                    original_artifact)
        results: list[VariantResult] = [original]
        artifacts: list[Artifact | None] = [original_artifact]
        restored = _restored(cached, session, variants)
        to_make = [variant for index, variant in enumerate(variants) if index not in restored]
        if to_make:
            begin(progress, f"making {len(to_make)} variant(s) on Ray")
        made_by_name = dict(zip((variant.name for variant in to_make),
                                cluster.get().make(request, to_make) if to_make else []))
        for index, variant in enumerate(variants):
            if index in restored:
                results.append(restored[index][0])
                artifacts.append(restored[index][1])
                continue
            made = made_by_name[variant.name]
            if isinstance(made, CompressorError):
                results.append(VariantResult(variant.name, [str(s) for s in variant.steps], error=made.message))
                artifacts.append(None)
                continue
            staged = stage(made, session.output.staging_path(variant.name))
            if cached is not None:
                cached.keep(variant, made.result, staged)
            made.result.metadata["made_on_node"] = made.node
            results.append(made.result)
            artifacts.append(staged)
        runs: dict[int, list[MeasuredArtifact]] = {index: [] for index, a in enumerate(artifacts) if a is not None}
        for index in runs:
            found = cached.measured(results[index].name, side_by_side=False) if cached is not None else None
            if found is not None and cached is not None:
                runs[index].append(found)
                results[index].notes.append(run_cache.cached_note(cached))
        # The original first, alone: every variant is then measured with its decisions (each
        # output's task, axes, thresholds), as a local run measures them.
        if not runs[0]:
            begin(progress, f"measuring the original on Ray{_of(0, request.repeats)}")
            measured = cluster.get().measure(request, [made_from(original, original_artifact)],
                                             original_model.inputs)[0]
            if isinstance(measured, CompressorError):
                raise measured
            runs[0].append(measured)
            _keep_measured(cached, session, ORIGINAL, measured)
        reference = runs[0][0]
        if request.data is not None:
            check_reference(reference, session.context.eval_data, request.measure, request.data)
        decided = replace(request, measure=with_original_tasks(request.measure, reference))
        for repeat in range(request.repeats):
            items, batch = [], []
            for index, artifact in enumerate(artifacts):
                if artifact is not None and len(runs[index]) == repeat:
                    items.append(index)
                    batch.append(made_from(results[index], artifact))
            if not batch:
                continue
            begin(progress, f"measuring {len(batch)} artifact(s) on Ray{_of(repeat, request.repeats)}")
            for index, outcome in zip(items, cluster.get().measure(decided, batch, original_model.inputs)):
                if isinstance(outcome, CompressorError):
                    if index == 0:
                        raise outcome
                    results[index].error = f"measuring failed: {outcome.message}"
                    artifacts[index] = None
                    continue
                runs[index].append(outcome)
                if repeat == 0:
                    _keep_measured(cached, session, results[index].name, outcome)
        for index, measured_runs in runs.items():
            if measured_runs and results[index].error is None:
                score(results[index], measured_runs, reference, session.context.eval_data, request.measure)
        if not cluster.started:
            results[0].notes.append("every variant and measurement came from the cache: Ray was not started")
        _note_cpu_models(results)
        return results, artifacts
    finally:
        cluster.close()


class _Cluster:
    """The run's :class:`RayExecutor`, started when first needed."""

    def __init__(self, request: RunRequest, extra_modules: Sequence[str]) -> None:
        self.request, self.extra_modules = request, extra_modules
        self.executor: RayExecutor | None = None
        self.started = False

    def get(self) -> RayExecutor:
        if self.executor is None:
            request = self.request
            self.executor = RayExecutor(request.ray_address, request.measure.threads, self.extra_modules,
                                        request.ray_timeout)
            self.started = True
        return self.executor

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()


def _restored(cached: run_cache.RunCache | None, session: Session,
              variants: Sequence[Variant]) -> dict[int, tuple[VariantResult, Artifact]]:
    """The variants the cache holds (by their index), restored into staging."""
    if cached is None:
        return {}
    found = {}
    for index, variant in enumerate(variants):
        hit = cached.restore(variant, lambda name=variant.name: session.output.staging_path(name))
        if hit is not None:
            found[index] = hit
    return found


def _keep_measured(cached: run_cache.RunCache | None, session: Session, name: str,
                   measured: MeasuredArtifact) -> None:
    """A measurement the cluster took, kept when its worker's machine is this one."""
    workdir = session.context.workdir
    if cached is not None and workdir is not None:
        cached.keep_measured(name, measured, workdir, side_by_side=False)


def _of(repeat: int, repeats: int) -> str:
    return f", repeat {repeat + 1} of {repeats}" if repeats > 1 else ""


def _note_cpu_models(results: list[VariantResult]) -> None:
    models = {r.metrics.get("cpu_model") for r in results if r.metrics.get("cpu_model")}
    if len(models) > 1 and results:
        results[0].notes.append(
            f"variants were measured on different CPU models ({', '.join(sorted(map(str, models)))}): "
            "compare their latencies only within one model (see each variant's cpu_model)")

