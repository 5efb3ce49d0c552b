"""Runners execute model pipelines on routed series: in-process (tests, `triage infer`) or on Ray (`triage serve`).

Both keep the same contract: one `SeriesResult` per routed series, never an exception for an AI failure, because
an AI failure must never remove a study from the worklist or lower its priority; the caller records it.
Ray is imported only in this module and in `serving`, the Ray Serve deployments it runs.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from triage.config import InferenceSettings, RaySettings
from triage.domain import Finding, RoutingDecision, SeriesInfo, SeriesResult, StageTimings
from triage.errors import TriageError
from triage.models.card import ModelCard
from triage.models.registry import ModelRegistry
from triage.models.runtime import OnnxModel, load_members
from triage.pipelines.base import ModelPipeline, pipeline_for
from triage.storage import InstanceSource, fetch

log = logging.getLogger(__name__)

Work = Sequence[tuple[SeriesInfo, RoutingDecision]]


class Runner(Protocol):
    def analyse(self, study_uid: str, work: Work) -> list[SeriesResult]: ...

    def warm_up(self) -> None: ...

    def health(self) -> dict[str, str | None]:
        """Each installed model's state: None when it can run now, else one sentence saying why not."""
        ...

    def close(self) -> None: ...


_REASON_MAX_CHARS = 160
# A stage's deadline is enforced inside its task and counts its run only. The runner waits this much longer before
# it kills a task (and its worker) that neither finished nor stopped itself: one still waiting for a worker to
# start and import the pipeline on a loaded node, or one stuck inside a native call the deadline cannot interrupt.
TASK_START_ALLOWANCE_S = 120.0
# Task workers warmed at start (at most; fewer where the cluster has fewer task slots). Ray keeps about one idle
# worker per CPU, so more would be let go again.
WARM_TASK_WORKERS = 2


def _one_line(text: str) -> str:
    """The first line of `text`, shortened for a worklist reason (the whole text goes to the log)."""
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return line if len(line) <= _REASON_MAX_CHARS else line[: _REASON_MAX_CHARS - 1] + "\u2026"


def _describe(exc: BaseException) -> str:
    """A one-line reason for the worklist; TriageErrors carry their own message, others get their type."""
    if isinstance(exc, TriageError):
        return _one_line(str(exc))
    return _one_line(f"{type(exc).__name__}: {exc}")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _last_line(text: str) -> str:
    """The last non-empty line of a traceback text (the exception itself), without terminal colours."""
    lines = [line.strip() for line in _ANSI.sub("", str(text)).splitlines() if line.strip()]
    return _one_line(lines[-1]) if lines else ""


def _mentions_oom(text: str) -> bool:
    """Ray's memory monitor says so in the death cause of the worker it killed."""
    # Only the memory monitor's own words: every worker-death text lists "the OOM killer" among possible causes.
    lowered = text.lower()
    return any(hint in lowered for hint in ("low on memory", "memory monitor", "outofmemoryerror"))


class ModelUnavailableError(Exception):
    """The model's deployment has no replica that can load it now (a transient failure: retried later)."""


def classify_failure(exc: BaseException, timeout_s: float | None = None, stage: str = "") -> tuple[bool, str]:
    """Whether a failed stage may succeed if tried again, and one short sentence for the worklist.

    Transient: the worker or its node died or was killed (Ray's memory monitor included), memory ran out, the
    stage missed its deadline, an intermediate object was lost, or the cluster could not be reached. Permanent:
    the input cannot be analysed (a TriageError such as an unreadable series) or the pipeline raised an error
    that would recur on the same input. Ray's long error texts (with other processes' command lines) never
    reach the worklist; the caller logs them.
    """
    try:
        import ray.exceptions as rex
    except ImportError:  # the in-process runner without Ray installed
        rex = None  # type: ignore[assignment]
    if rex is not None:
        try:
            import ray.serve.exceptions as sex
        except ImportError:
            sex = None  # type: ignore[assignment]
        if sex is not None:
            if isinstance(exc, sex.RequestCancelledError):
                return True, f"{stage or 'a stage'} was cancelled"
            if isinstance(exc, sex.BackPressureError):
                return True, "every replica of the model is busy (back-pressure)"
            if isinstance(exc, sex.DeploymentUnavailableError | sex.ReplicaUnavailableError):
                return True, "the model's replicas are not available now"
        if isinstance(exc, rex.RayTaskError) and not isinstance(exc, rex.RayActorError):
            cause = getattr(exc, "cause", None)
            if cause is not None and cause is not exc:
                return classify_failure(cause, timeout_s, stage)
            return False, _describe(exc)
        if isinstance(exc, rex.OutOfMemoryError):
            return True, "the model worker ran out of memory"
        if isinstance(exc, rex.RayActorError):
            if getattr(exc, "actor_init_failed", False):
                return True, f"the model worker cannot load the model ({_last_line(getattr(exc, 'error_msg', ''))})"
            if _mentions_oom(str(exc)):
                return True, "the model worker ran out of memory"
            return True, "the model worker stopped unexpectedly"
        if isinstance(exc, rex.WorkerCrashedError):
            if _mentions_oom(str(exc)):
                return True, "a worker process ran out of memory"
            return True, "a worker process crashed"
        if isinstance(exc, rex.NodeDiedError | rex.LocalRayletDiedError):
            return True, "a cluster node was lost"
        if isinstance(
            exc,
            rex.ObjectLostError | rex.ObjectFetchTimedOutError | rex.ObjectStoreFullError | rex.OutOfDiskError,
        ):
            return True, "intermediate data was lost on the cluster"
        if isinstance(exc, rex.GetTimeoutError):
            limit = f" of {timeout_s:g} s" if timeout_s else ""
            return True, f"{stage or 'a stage'} did not finish within its deadline{limit}"
        if isinstance(exc, rex.TaskCancelledError):
            return True, "a stage was cancelled"
        if isinstance(exc, rex.TaskUnschedulableError | rex.ActorUnschedulableError):
            return True, "no cluster node can run the stage now"
        if isinstance(exc, rex.RaySystemError | rex.RpcError):
            return True, "the Ray cluster could not be reached"
    if isinstance(exc, ModelUnavailableError):
        return True, _one_line(str(exc))
    # MONAI re-raises what a transform raised as "RuntimeError: applying transform ...": look down the chain.
    for link in _causes(exc):
        if isinstance(link, MemoryError):
            return True, "the model worker ran out of memory"
        if isinstance(link, TimeoutError):  # StageDeadlineError from inside a task included
            limit = f" of {timeout_s:g} s" if timeout_s else ""
            return True, f"{stage or 'a stage'} did not finish within its deadline{limit}"
    return False, _describe(exc)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from (`raise ... from`), without cycles."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__


class InProcessRunner:
    """Runs every stage in the calling process. Sessions are loaded once per model and reused.

    Series are read from `source` by key: the service's store, or (None) file paths (`triage infer PATH`).
    """

    def __init__(
        self, registry: ModelRegistry, inference: InferenceSettings, source: InstanceSource | None = None
    ) -> None:
        self.registry = registry
        self.inference = inference
        self.source = source
        self._loaded: dict[str, tuple[ModelPipeline, list[OnnxModel]]] = {}
        self._lock = threading.Lock()

    def _load(
        self, name: str, timings: StageTimings, version: str | None = None
    ) -> tuple[ModelPipeline, list[OnnxModel]]:
        """The pipeline and sessions of `name` at `version` (the newest installed when None), loaded once."""
        with self._lock:
            model = self.registry.get(name, version)
            key = model.card.key
            if key not in self._loaded:
                started = time.perf_counter()
                members = load_members(
                    model,
                    self.inference.providers,
                    self.inference.ensemble_members,
                    self.inference.intra_op_threads,
                    fp16=self.inference.fp16,
                    trt_cache_dir=self.inference.trt_cache_dir,
                    bf16=self.inference.bf16,
                )
                self._loaded[key] = (pipeline_for(model.card), members)
                timings.add("model-load", time.perf_counter() - started)
            return self._loaded[key]

    def warm_up(self) -> None:
        for name in self.registry.names():
            try:
                self._load(name, StageTimings())
            except TriageError as exc:
                log.error("model %s cannot be loaded: %s", name, exc)

    def analyse(self, study_uid: str, work: Work) -> list[SeriesResult]:
        results = []
        for series, decision in work:
            assert decision.model is not None
            timings = StageTimings()
            card: ModelCard | None = None
            try:
                pipeline, members = self._load(decision.model, timings, decision.model_version)
                card = pipeline.card
                started = time.perf_counter()
                loaded = pipeline.load(series, self.source)
                timings.add("load", time.perf_counter() - started)
                started = time.perf_counter()
                prepared = pipeline.preprocess(loaded)
                timings.add("preprocess", time.perf_counter() - started)
                started = time.perf_counter()
                raw = pipeline.infer(prepared, members)
                timings.add("inference", time.perf_counter() - started)
                started = time.perf_counter()
                findings = pipeline.postprocess(prepared, raw, series)
                timings.add("postprocess", time.perf_counter() - started)
                results.append(SeriesResult(series.series_uid, card.name, card.version, True, findings, "", timings))
            except Exception as exc:  # noqa: BLE001 - an AI failure is recorded, never raised to the worklist
                transient, reason = classify_failure(exc)
                log.warning(
                    "study %s series %s: %s failed (%s): %s",
                    study_uid,
                    series.series_uid,
                    decision.model,
                    "transient" if transient else "permanent",
                    _describe(exc),
                )
                log.debug("%s", traceback.format_exc())
                results.append(
                    SeriesResult(
                        series.series_uid,
                        decision.model,
                        card.version if card else (decision.model_version or ""),
                        False,
                        [],
                        reason,
                        timings,
                        transient=transient,
                    )
                )
        return results

    def health(self) -> dict[str, str | None]:
        """A model runs in this process once its sessions load; a load error is reported until one succeeds."""
        state: dict[str, str | None] = {}
        for name in self.registry.names():
            try:
                self._load(name, StageTimings())
                state[name] = None
            except Exception as exc:  # noqa: BLE001 - reported, the others keep running
                state[name] = f"cannot be loaded: {_describe(exc)}"
        return state

    def close(self) -> None:
        self._loaded.clear()


# ---------------------------------------------------------------------------------------------- Ray


def _node_id() -> str:
    """The Ray node this process runs on ("" outside Ray)."""
    import ray

    return str(ray.get_runtime_context().get_node_id()) if ray.is_initialized() else ""


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    return fn(*args), time.perf_counter() - started


class StageDeadlineError(TimeoutError):
    """A stage ran past its deadline inside its task (a transient failure: the attempt is retried)."""


@contextlib.contextmanager
def run_deadline(seconds: float) -> Iterator[None]:
    """Raise StageDeadlineError in this thread once the block has run `seconds`.

    Used inside Ray tasks, which run on their worker's main thread: the stage stops where it is and the worker
    process lives on, with its imports, for the next task (killing it would make the next study's stage start a
    cold worker inside its own deadline). Armed after the pipeline is imported, so an import is never cut in half.
    Off the main thread, or with no deadline, the block runs unguarded and the caller's own wait applies.
    """
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    expired = False

    def _expire(signum: int, frame: Any) -> None:
        nonlocal expired
        expired = True
        raise StageDeadlineError(f"ran past its deadline of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except Exception as exc:
        # Libraries re-raise what they caught (MONAI: "applying transform ..."), and the chain does not survive
        # Ray's pickling of the error: say plainly that the deadline is what stopped the stage.
        if expired and not isinstance(exc, StageDeadlineError):
            raise StageDeadlineError(f"ran past its deadline of {seconds:g} s") from exc
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _ray_preprocess(
    card_json: dict[str, Any], series: SeriesInfo, source: InstanceSource | None, deadline_s: float
) -> tuple[Any, float, float, str]:
    """Ray task: decode and preprocess one series on whichever node has a CPU free, within `deadline_s`.

    Returns:
        (prepared input, load seconds, preprocess seconds, the Ray node ID).
    """
    pipeline = pipeline_for(ModelCard.model_validate(card_json))
    with run_deadline(deadline_s):
        loaded, load_s = _timed(pipeline.load, series, source)
        prepared, preprocess_s = _timed(pipeline.preprocess, loaded)
    return prepared, load_s, preprocess_s, _node_id()


def _ray_postprocess(
    card_json: dict[str, Any], prepared: Any, raw: Any, series: SeriesInfo, deadline_s: float
) -> tuple[list[Finding], float, str]:
    """Ray task: turn one series' raw outputs into findings within `deadline_s`. Returns (findings, seconds, the
    Ray node ID)."""
    pipeline = pipeline_for(ModelCard.model_validate(card_json))
    with run_deadline(deadline_s):
        findings, seconds = _timed(pipeline.postprocess, prepared, raw, series)
    return findings, seconds, _node_id()


def _ray_warm(cards_json: list[dict[str, Any]]) -> tuple[str, int]:
    """Ray task: import every installed model's pipeline (torch, MONAI and the rest: seconds on a cold worker)
    so that the task worker it ran on is ready when a study arrives. Returns (the Ray node ID, the worker's pid)."""
    import os

    for card_json in cards_json:
        pipeline_for(ModelCard.model_validate(card_json))
    return _node_id(), os.getpid()


@dataclass
class _Deployment:
    """What the runner knows of one model version's Serve application."""

    app: str
    handle: Any = None
    # When a failed deployment may be deployed again (monotonic seconds), and the wait after that.
    redeploy_after: float = 0.0
    redeploy_backoff_s: float = 0.0


class RayRunner:
    """Runs preprocessing and post-processing as Ray tasks and inference on Ray Serve deployments.

    Starts a local Ray instance unless `RaySettings.address` names a cluster to join. Every installed model
    version is a Serve application (`<name>-<version>`, see triage.pipelines.serving) reached through its
    deployment handle; Serve runs no HTTP proxy. Replicas ask for GPUs when the cluster has them
    (`gpus_per_inference_worker`), so the same code scales from a laptop to a cluster of CPU and GPU nodes.
    Workers on other nodes need `triage` installed in the same version.

    A series' instances are read from the store by this process and put into Ray's object store; decoding,
    preprocessing and post-processing run as tasks on any node with a CPU free, inference on a replica, and only
    timings, raw outputs and findings come back here. Serve replaces replicas that die or fail their health
    check; `health()` reads Serve's status, deploys again a model whose deployment failed, and reports each
    model's state. A call past its deadline is cancelled. Failures are returned with `transient` set when trying
    again may succeed; the caller decides on retries (tasks have max_retries=0 so that every attempt is counted).
    """

    def __init__(
        self,
        registry: ModelRegistry,
        inference: InferenceSettings,
        ray_settings: RaySettings,
        source: InstanceSource | None = None,
    ) -> None:
        import ray
        from ray import serve

        self._ray = ray
        self._serve = serve
        self.source = source
        self.registry = registry
        self.inference = inference
        self.ray_settings = ray_settings
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
            if ray_settings.address:
                ray.init(address=ray_settings.address, **kwargs)
            else:
                # "local": a new instance of our own, even when another Ray cluster runs on this machine (a
                # bare ray.init() would join the latest one it finds there).
                ray.init(address="local", num_cpus=ray_settings.num_cpus, **kwargs)
        # Deployment handles only: no HTTP proxy inside the cluster.
        serve.start(proxy_location="Disabled")
        resources = ray.cluster_resources()
        self.has_gpu = resources.get("GPU", 0) > 0
        self.node_id = _node_id()
        task_options: dict[str, Any] = {"num_cpus": ray_settings.cpus_per_task, "max_retries": 0}
        if ray_settings.task_resources:
            task_options["resources"] = dict(ray_settings.task_resources)
        self._preprocess = ray.remote(num_returns=4, **task_options)(_ray_preprocess)  # type: ignore[call-overload]
        self._postprocess = ray.remote(**task_options)(_ray_postprocess)
        self._warm = ray.remote(**task_options, scheduling_strategy="SPREAD")(_ray_warm)
        self._task_slots = max(1, int(resources.get("CPU", 0) // max(ray_settings.cpus_per_task, 0.01)))
        self.timeout_s = inference.timeout_s
        self._deployments: dict[str, _Deployment] = {}
        # Deployments of versions other than the newest of their model, by "name@version".
        self._other_versions: dict[str, _Deployment] = {}
        self._lock = threading.RLock()
        self.load_errors: dict[str, str] = {}
        # Each model's state at the last health check: None when it can run, else why not.
        self.model_state: dict[str, str | None] = {}
        # What each model's replicas said at the last health check (model, version, process, node, providers).
        self.worker_info: dict[str, list[dict[str, Any]]] = {}

    # -------------------------------------------------------------- deployments

    def _application(self, name: str) -> str:
        from triage.pipelines.serving import application_name

        return application_name(self.registry.get(name).card)

    def _state(self, name: str) -> _Deployment:
        """What the runner knows of `name`'s deployment (created on first use)."""
        return self._deployments.setdefault(name, _Deployment(self._application(name)))

    def _deploy(self, name: str) -> _Deployment:
        """Deploy `name`'s installed version (or take the running deployment another process made) and wait
        until its replicas are up.

        Raises:
            ModelLoadError: when the weights do not match the card (checked before any replica starts).
            RuntimeError: (Serve's) when the replicas cannot start.
        """
        from triage.pipelines.serving import build_application

        model = self.registry.get(name)
        model.verify()  # refuse mismatched weights before any replica starts
        state = self._state(name)
        running = self._serve.status().applications.get(state.app)
        if running is not None and str(running.status).endswith("RUNNING"):
            # Another analysis process of the cluster deployed it: deploying again would restart its replicas.
            state.handle = self._serve.get_app_handle(state.app)
            return state
        app = build_application(self.registry.weights_dir, model.card, self.inference, self.ray_settings, self.has_gpu)
        state.handle = self._serve.run(app, name=state.app, route_prefix=None)
        return state

    def _handle(self, name: str) -> Any:
        with self._lock:
            state = self._deployments.get(name)
            if state is None or state.handle is None:
                state = self._deploy(name)
            return state.handle

    def _handle_for(self, card: ModelCard) -> Any:
        """The deployment handle of `card`'s version: the newest installed goes through the health-managed path;
        an older version running beside it (the one in use while a new one is in shadow, or the reverse) is
        deployed on first use, and Serve replaces its dead replicas the same way."""
        if card.version == self.registry.get(card.name).card.version:
            return self._handle(card.name)
        from triage.pipelines.serving import application_name, build_application

        with self._lock:
            state = self._other_versions.setdefault(card.key, _Deployment(application_name(card)))
            if state.handle is None:
                model = self.registry.get(card.name, card.version)
                model.verify()
                running = self._serve.status().applications.get(state.app)
                if running is not None and str(running.status).endswith("RUNNING"):
                    state.handle = self._serve.get_app_handle(state.app)
                else:
                    app = build_application(
                        self.registry.weights_dir, model.card, self.inference, self.ray_settings, self.has_gpu
                    )
                    state.handle = self._serve.run(app, name=state.app, route_prefix=None)
            return state.handle

    def _warm_task_workers(self, count: int) -> list[Any]:
        """Start `count` warm-up tasks (spread over the nodes) that import the installed models' pipelines.

        A cold worker spends seconds importing torch and MONAI before its first stage can start; warm workers
        stay in Ray's pool for the tasks that follow, so a study's first stage does not wait for that.
        """
        cards = [self.registry.get(name).card.model_dump(mode="json") for name in self.registry.names()]
        return [self._warm.remote(cards) for _ in range(count)]

    def warm_up(self) -> None:
        """Warm the task workers, deploy every installed model version and wait until its replicas have loaded
        their sessions."""
        warming = self._warm_task_workers(min(self._task_slots, WARM_TASK_WORKERS))
        for name in self.registry.names():
            try:
                self._handle(name)
                log.info("model %s deployed on Ray Serve", name)
            except TriageError as exc:  # weights or card: permanent until the model is reinstalled
                self.load_errors[name] = _describe(exc)
                log.error("model %s cannot be loaded: %s", name, _describe(exc))
            except Exception as exc:  # noqa: BLE001 - replicas failed to start: deployed again by health()
                log.error("model %s: its replicas cannot start: %s", name, _last_line(str(exc)))
                self._schedule_redeploy(name)
        try:
            warmed = self._ray.get(warming, timeout=self.inference.probe_timeout_s)
            log.info("task workers warmed: %d (pids %s)", len(warmed), sorted(pid for _, pid in warmed))
        except Exception as exc:  # noqa: BLE001 - only slower first studies follow
            log.warning("warming the task workers failed: %s", _last_line(str(exc)))

    def _schedule_redeploy(self, name: str) -> None:
        with self._lock:
            state = self._state(name)
            backoff_s = state.redeploy_backoff_s or self.ray_settings.worker_replace_backoff_s
            state.redeploy_after = time.monotonic() + backoff_s
            state.redeploy_backoff_s = min(300.0, backoff_s * 2)
            state.handle = None

    def _describe_replicas(self, handle: Any, replicas: int) -> list[dict[str, Any]]:
        """Ask the replicas about themselves through the handle (Serve spreads the calls; a few extra reach all)."""
        seen: dict[int, dict[str, Any]] = {}
        for _ in range(max(1, replicas) * 3):
            try:
                info = handle.describe.remote().result(timeout_s=self.inference.probe_timeout_s)
            except Exception:  # noqa: BLE001 - a replica dying now; Serve's own state is reported instead
                log.debug("describing a replica failed", exc_info=True)
                break
            seen[int(info["pid"])] = info
            if len(seen) >= replicas:
                break
        return list(seen.values())

    def health(self) -> dict[str, str | None]:
        """Each model's state from Serve; a deployment that failed is deployed again (with a doubling wait).

        Returns:
            model name -> None when its deployment is healthy, else one sentence saying why it cannot run now.
        """
        state: dict[str, str | None] = {}
        try:
            applications = self._serve.status().applications
        except Exception as exc:  # noqa: BLE001 - the cluster itself is unreachable
            _, why = classify_failure(exc)
            return {name: why for name in self.registry.names() if name not in self.load_errors}
        for name in self.registry.names():
            if name in self.load_errors:
                continue  # refused at start (weights, card): reported as such
            try:
                app_name = self._application(name)
            except Exception as exc:  # noqa: BLE001
                state[name] = f"cannot be loaded: {_describe(exc)}"
                continue
            app = applications.get(app_name)
            deployment = app.deployments.get(app_name) if app is not None else None
            status = str(deployment.status).rsplit(".", 1)[-1] if deployment is not None else ""
            app_status = str(app.status).rsplit(".", 1)[-1] if app is not None else ""
            if deployment is not None and status == "HEALTHY" and app_status == "RUNNING":
                state[name] = None
                running = sum(int(n) for k, n in deployment.replica_states.items() if str(k).endswith("RUNNING")) or 1
                with contextlib.suppress(Exception):
                    self.worker_info[name] = self._describe_replicas(self._handle(name), running)
                continue
            message = _last_line(getattr(deployment, "message", "") or getattr(app, "message", "") or "")
            if app is None or app_status in ("DEPLOY_FAILED", "UNHEALTHY") or status in ("UNHEALTHY", "DEPLOY_FAILED"):
                state[name] = "the model worker cannot load the model" + (f" ({message})" if message else "")
                self._try_redeploy(name, app is None or app_status == "DEPLOY_FAILED")
            else:  # DEPLOYING, UPDATING, UPSCALING: replicas are starting
                state[name] = "the model worker is not answering (starting or restarting)"
        self.model_state = dict(state)
        return state

    def _try_redeploy(self, name: str, needed: bool) -> None:
        """Deploy `name` again once its wait is over, when Serve has given up on it (or it is gone)."""
        with self._lock:
            deployment = self._state(name)
            if not needed or time.monotonic() < deployment.redeploy_after:
                return
            try:
                self._deploy(name)
                deployment.redeploy_backoff_s = 0.0
                log.warning("model %s deployed again on Ray Serve", name)
            except Exception as exc:  # noqa: BLE001 - tried again after the wait
                log.warning("model %s: deploying again failed: %s", name, _last_line(str(exc)))
                self._schedule_redeploy(name)

    # -------------------------------------------------------------- analysis

    def _get(self, ref: Any) -> Any:
        """Wait for `ref` (or a list of the results of one task). The task stops itself at the stage deadline
        (`run_deadline`); one that has neither finished nor stopped `TASK_START_ALLOWANCE_S` later is cancelled.

        That task is killed with its worker process (an interrupt could land inside an import and leave the
        worker with half-initialised modules), and a warm-up task starts a replacement worker at once.

        Raises:
            ray.exceptions.GetTimeoutError: past the deadline and the allowance (after cancelling the task).
        """
        try:
            return self._ray.get(ref, timeout=self.timeout_s + TASK_START_ALLOWANCE_S)
        except self._ray.exceptions.GetTimeoutError:
            with contextlib.suppress(Exception):
                self._ray.cancel(ref[0] if isinstance(ref, list) else ref, force=True)
                self._warm_task_workers(1)
            raise

    def _submit(self, card_json: dict[str, Any], series: SeriesInfo) -> tuple[float, Any]:
        """Read one series from the store into Ray's object store and start its preprocessing task.

        Returns:
            (seconds spent reading the store here, the task's four result references).
        """
        started = time.perf_counter()
        if self.source is None:  # keys are file paths readable where the task runs (tests, a single node)
            fetched: Any = None
        else:
            fetched = self._ray.put(fetch(self.source, tuple(series.files)))
        fetch_s = time.perf_counter() - started
        return fetch_s, self._preprocess.remote(card_json, series, fetched, self.timeout_s)

    def analyse(self, study_uid: str, work: Work) -> list[SeriesResult]:
        pending: list[tuple[SeriesInfo, RoutingDecision, ModelCard | None, Any, Any, Exception | None]] = []
        for series, decision in work:
            assert decision.model is not None
            try:
                model = self.registry.get(decision.model, decision.model_version)
                card_json = model.card.model_dump(mode="json")
                pending.append((series, decision, model.card, card_json, self._submit(card_json, series), None))
            except Exception as exc:  # noqa: BLE001
                pending.append((series, decision, None, None, None, exc))
        return [self._finish(study_uid, *entry) for entry in pending]

    def _finish(
        self,
        study_uid: str,
        series: SeriesInfo,
        decision: RoutingDecision,
        card: ModelCard | None,
        card_json: Any,
        submitted: Any,
        error: Exception | None,
    ) -> SeriesResult:
        timings = StageTimings()
        version = card.version if card else (decision.model_version or "")
        stage = "preprocess"  # the task reads and preprocesses the series
        try:
            if error is not None:
                raise error
            fetch_s, (prepared_ref, load_ref, preprocess_ref, node_ref) = submitted
            # A hung stage must not hold an analysis thread for ever: each has a deadline. Only timings, raw
            # outputs and findings come back here; the volume stays in the object store.
            load_s, preprocess_s, node = self._get([load_ref, preprocess_ref, node_ref])
            timings.add("load", fetch_s + load_s, node)
            timings.add("preprocess", preprocess_s, node)
            stage = "inference"
            problem = self.model_state.get(decision.model or "")
            if problem and "cannot load" in problem:
                # Serve would queue the request until a replica starts: fail it now, to be retried later.
                raise ModelUnavailableError(problem)
            response = self._handle_for(card).infer.remote(prepared_ref)  # type: ignore[arg-type]
            try:
                raw, seconds, node = response.result(timeout_s=self.timeout_s)
            except TimeoutError:
                response.cancel()  # the replica stops the request; its other requests go on
                raise
            timings.add("inference", seconds, node)
            stage = "postprocess"
            postprocessed = self._postprocess.remote(card_json, prepared_ref, raw, series, self.timeout_s)
            findings, seconds, node = self._get(postprocessed)
            timings.add("postprocess", seconds, node)
            return SeriesResult(series.series_uid, card.name, version, True, findings, "", timings)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 - an AI failure is recorded, never raised to the worklist
            transient, reason = classify_failure(exc, self.timeout_s, stage)
            # The whole Ray text (with other processes' command lines) goes to the log only.
            log.warning(
                "study %s series %s: %s failed at %s (%s): %s",
                study_uid,
                series.series_uid,
                decision.model,
                stage,
                "transient" if transient else "permanent",
                reason,
            )
            log.debug("study %s: full error: %s", study_uid, exc)
            return SeriesResult(series.series_uid, decision.model or "", version, False, [], reason, timings, transient)

    def close(self) -> None:
        # On a shared cluster the deployments stay for the other analysis processes; a local instance ends here.
        self._deployments.clear()
        self._other_versions.clear()
        if not self.ray_settings.address:
            with contextlib.suppress(Exception):
                self._serve.shutdown()
            self._ray.shutdown()


def make_runner(
    kind: str,
    registry: ModelRegistry,
    inference: InferenceSettings,
    ray_settings: RaySettings,
    source: InstanceSource | None = None,
) -> Runner:
    """`kind` is "ray" (the service) or "inprocess" (tests and `triage infer`); series are read from `source`
    (the store) by key, or by file path when it is None."""
    if kind == "ray":
        return RayRunner(registry, inference, ray_settings, source)
    if kind == "inprocess":
        return InProcessRunner(registry, inference, source)
    raise TriageError(f"unknown runner {kind!r}; valid: 'ray', 'inprocess'")
