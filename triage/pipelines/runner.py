"""Runners execute model pipelines on routed series: in-process (tests, `triage infer`) or on Ray (`triage serve`).

Both keep the same contract: one `SeriesResult` per routed series, never an exception for an AI failure, because
an AI failure must never remove a study from the worklist or lower its priority; the caller records it.
Ray is imported only in this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from triage.config import InferenceSettings, RaySettings
from triage.domain import Finding, RoutingDecision, SeriesInfo, SeriesResult, StageTimings
from triage.errors import TriageError
from triage.models.card import ModelCard
from triage.models.registry import ModelRegistry
from triage.models.runtime import OnnxModel, load_members
from triage.pipelines.base import ModelPipeline, pipeline_for
from triage.storage import InstanceSource, MemorySource, fetch

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
    lowered = text.lower()
    return any(
        hint in lowered for hint in ("out of memory", "low on memory", "memory monitor", "outofmemoryerror", "oom")
    )


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
    if isinstance(exc, MemoryError):
        return True, "the model worker ran out of memory"
    if isinstance(exc, TimeoutError):
        return True, "a stage did not finish within its deadline"
    return False, _describe(exc)


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

    def _load(self, name: str, timings: StageTimings) -> tuple[ModelPipeline, list[OnnxModel]]:
        with self._lock:
            if name not in self._loaded:
                started = time.perf_counter()
                model = self.registry.get(name)
                members = load_members(
                    model, self.inference.providers, self.inference.ensemble_members, self.inference.intra_op_threads
                )
                self._loaded[name] = (pipeline_for(model.card), members)
                timings.add("model-load", time.perf_counter() - started)
            return self._loaded[name]

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
                pipeline, members = self._load(decision.model, timings)
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
                        card.version if card else "",
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


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    return fn(*args), time.perf_counter() - started


def _ray_fetch(source: InstanceSource, keys: tuple[str, ...]) -> tuple[MemorySource, float]:
    """Read a series' instances from the store on the store's node; the bytes travel in Ray's object store."""
    return _timed(fetch, source, keys)


def _ray_preprocess(
    card_json: dict[str, Any], series: SeriesInfo, source: InstanceSource | None
) -> tuple[Any, float, float]:
    pipeline = pipeline_for(ModelCard.model_validate(card_json))
    loaded, load_s = _timed(pipeline.load, series, source)
    prepared, preprocess_s = _timed(pipeline.preprocess, loaded)
    return prepared, load_s, preprocess_s


def _ray_postprocess(
    card_json: dict[str, Any], prepared: Any, raw: Any, series: SeriesInfo
) -> tuple[list[Finding], float]:
    pipeline = pipeline_for(ModelCard.model_validate(card_json))
    return _timed(pipeline.postprocess, prepared, raw, series)


class _InferenceWorker:
    """Ray actor body: loads one model's ONNX members once and keeps them for every study."""

    def __init__(self, weights_dir: str, name: str, inference: dict[str, Any]) -> None:
        settings = InferenceSettings.model_validate(inference)
        started = time.perf_counter()
        model = ModelRegistry(Path(weights_dir)).get(name)
        self.pipeline = pipeline_for(model.card)
        self.members = load_members(model, settings.providers, settings.ensemble_members, settings.intra_op_threads)
        self.load_s = time.perf_counter() - started

    def describe(self) -> dict[str, Any]:
        import ray

        return {
            "members": len(self.members),
            "providers": self.members[0].providers,
            "load_s": round(self.load_s, 3),
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def infer(self, prepared: Any) -> tuple[Any, float]:
        return _timed(self.pipeline.infer, prepared, self.members)


# The health probe runs in its own concurrency group, so that a worker busy with a long inference still answers.
_PROBE_GROUP = "probe"
# A worker that misses this many probes in a row (without having died) is replaced: it is hung.
_MAX_MISSED_PROBES = 3


@dataclass
class _WorkerSlot:
    """One inference worker of a model, with what the health probe knows of it."""

    actor: Any
    missed_probes: int = 0
    # When a replacement may be started next (monotonic seconds) and the wait after that one fails too.
    replace_after: float = 0.0
    replace_backoff_s: float = 0.0


class RayRunner:
    """Runs preprocessing and post-processing as Ray CPU tasks and inference in long-lived actors.

    Starts a local Ray instance unless `RaySettings.address` names a cluster to join. Inference actors ask for
    GPUs when the cluster has them (`gpus_per_inference_worker`), so the same code scales from a laptop to a
    cluster of CPU and GPU nodes. Workers on other nodes need `triage` installed in the same version.

    Workers that die (killed, OOM-killed by Ray's memory monitor, their node lost) are restarted by Ray
    (`worker_max_restarts`); `health()` probes every worker and replaces one that is dead for good, cannot load
    its model or is hung. A call past its deadline is cancelled (a hung worker restarted). Failures are returned
    with `transient` set when trying again may succeed; the caller decides on retries.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        inference: InferenceSettings,
        ray_settings: RaySettings,
        source: InstanceSource | None = None,
    ) -> None:
        import ray

        self._ray = ray
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
        self.has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        # The store's disk is on this node: a small task pinned here reads a series' bytes into Ray's object
        # store, and every other stage runs anywhere in the cluster, handed object references (preprocess ->
        # inference actor -> post-processing), so no node needs the store's file system and no volume comes
        # back to this process between stages. Task retries are left to the caller, which records each
        # attempt (max_retries=0).
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self._fetch = ray.remote(num_cpus=0.25, max_retries=0, num_returns=2, scheduling_strategy=here)(  # type: ignore[call-overload]
            _ray_fetch
        )
        self._preprocess = ray.remote(num_cpus=1, max_retries=0, num_returns=3)(_ray_preprocess)  # type: ignore[call-overload]
        self._postprocess = ray.remote(num_cpus=1, max_retries=0)(_ray_postprocess)
        self.timeout_s = inference.timeout_s
        gpus = ray_settings.gpus_per_inference_worker if self.has_gpu else 0
        # An actor holds its resources for life: by default it reserves no CPU, so preprocessing tasks are never
        # starved of a slot by idle inference workers (each model has one).
        self._actor_cls = ray.remote(  # type: ignore[call-overload]
            num_gpus=gpus,
            num_cpus=ray_settings.cpus_per_inference_worker,
            max_restarts=ray_settings.worker_max_restarts,
            max_task_retries=0,
            concurrency_groups={_PROBE_GROUP: 1},
        )(_InferenceWorker)
        self._workers: dict[str, list[_WorkerSlot]] = {}
        self._next: dict[str, int] = {}
        self._lock = threading.RLock()  # _worker takes it and calls _pool, which takes it too
        self.load_errors: dict[str, str] = {}
        # What each model's workers said at the last health probe (process, node, providers).
        self.worker_info: dict[str, list[dict[str, Any]]] = {}

    def _start_workers(self, name: str) -> list[_WorkerSlot]:
        model = self.registry.get(name)
        model.verify()  # refuse mismatched weights before any worker starts
        return [
            _WorkerSlot(self._actor_cls.remote(str(self.registry.weights_dir), name, self.inference.model_dump()))
            for _ in range(max(1, self.ray_settings.inference_workers))
        ]

    def _pool(self, name: str) -> list[_WorkerSlot]:
        """`name`'s workers, started when it has none yet (a copy of the list)."""
        with self._lock:
            if name not in self._workers:
                self._workers[name] = self._start_workers(name)
                self._next[name] = 0
            return list(self._workers[name])

    def _worker(self, name: str) -> _WorkerSlot:
        """The next of `name`'s workers, in turn."""
        with self._lock:
            pool = self._pool(name)
            slot = pool[self._next[name] % len(pool)]
            self._next[name] += 1
            return slot

    def _replace(self, name: str, slot: _WorkerSlot, why: str) -> None:
        """Kill `slot`'s actor for good and start a fresh one in its place (it loads the model again).

        A model that keeps failing to load is not restarted in a tight loop: each replacement of the same slot
        waits twice as long as the one before (from `worker_replace_backoff_s` up to 5 minutes)."""
        now = time.monotonic()
        if now < slot.replace_after:
            return
        with self._lock:
            pool = self._workers.get(name, [])
            if slot not in pool:
                return  # already replaced by another thread
            try:
                self._ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - it may be gone already
                log.debug("killing the old %s worker failed", name, exc_info=True)
            backoff_s = slot.replace_backoff_s or self.ray_settings.worker_replace_backoff_s
            pool[pool.index(slot)] = _WorkerSlot(
                self._actor_cls.remote(str(self.registry.weights_dir), name, self.inference.model_dump()),
                replace_after=now + backoff_s,
                replace_backoff_s=min(300.0, backoff_s * 2),
            )
        log.warning("inference worker for %s replaced: %s", name, why)

    def warm_up(self) -> None:
        """Start the inference actors of every installed model and wait until their sessions are loaded."""
        for name in self.registry.names():
            try:
                info = self._ray.get(self._worker(name).actor.describe.remote())
                log.info("inference worker for %s ready: %s", name, info)
            except Exception as exc:  # noqa: BLE001 - a model that cannot load is reported, the service runs on
                self.load_errors[name] = _describe(exc)
                log.error("model %s cannot be loaded: %s", name, _describe(exc))
                with self._lock:
                    self._workers.pop(name, None)

    def health(self) -> dict[str, str | None]:
        """Probe every worker of every model that loaded at start; replace the dead and the hung ones.

        Returns:
            model name -> None when all its workers answered, else one sentence saying why it cannot run now.
        """
        state: dict[str, str | None] = {}
        for name in self.registry.names():
            if name in self.load_errors:
                continue  # refused at start (weights, card): reported as such, not probed
            try:
                slots = self._pool(name)  # (re)creates the pool when a replacement failed to start
            except Exception as exc:  # noqa: BLE001
                state[name] = f"cannot start a worker: {_describe(exc)}"
                continue
            problems = []
            info = []
            for slot in slots:
                try:
                    probe = slot.actor.describe.options(concurrency_group=_PROBE_GROUP).remote()
                    info.append(self._ray.get(probe, timeout=self.inference.probe_timeout_s))
                    slot.missed_probes = 0
                    slot.replace_backoff_s = 0.0
                except self._ray.exceptions.GetTimeoutError:
                    # Loading or restarting takes a while; only a worker that stays silent is treated as hung.
                    slot.missed_probes += 1
                    problems.append("the model worker is not answering (starting or restarting)")
                    if slot.missed_probes >= _MAX_MISSED_PROBES:
                        self._replace(name, slot, f"no answer to {slot.missed_probes} health probes")
                except Exception as exc:  # noqa: BLE001 - dead for good, or its model failed to load
                    _, detail = classify_failure(exc)
                    problems.append(detail)
                    log.warning("inference worker for %s failed its health probe: %s", name, _last_line(str(exc)))
                    log.debug("health probe of %s: %s", name, exc)
                    self._replace(name, slot, detail)
            state[name] = "; ".join(dict.fromkeys(problems)) or None
            self.worker_info[name] = info
        return state

    def _get(self, ref: Any) -> Any:
        """Wait for `ref` (or a list of the results of one task) until the stage deadline; a task still running
        then is cancelled.

        Raises:
            ray.exceptions.GetTimeoutError: past the deadline (after cancelling the task).
        """
        try:
            return self._ray.get(ref, timeout=self.timeout_s)
        except self._ray.exceptions.GetTimeoutError:
            with contextlib.suppress(Exception):
                self._ray.cancel(ref[0] if isinstance(ref, list) else ref, force=True)
            raise

    def _submit(self, card_json: dict[str, Any], series: SeriesInfo) -> tuple[Any, Any, Any, Any, Any]:
        """Start reading and preprocessing one series; returns object references, nothing is fetched here.

        Returns:
            (fetch seconds, prepared input, load seconds, preprocess seconds, the fetch's bytes) references.
        """
        if self.source is None:  # keys are file paths readable where the task runs (tests, a single node)
            fetched, fetch_s = None, self._ray.put(0.0)
        else:
            fetched, fetch_s = self._fetch.remote(self.source, tuple(series.files))
        refs: Any = self._preprocess.remote(card_json, series, fetched)  # num_returns=3: three references
        prepared, load_s, preprocess_s = refs
        return fetch_s, prepared, load_s, preprocess_s, fetched

    def analyse(self, study_uid: str, work: Work) -> list[SeriesResult]:
        pending: list[tuple[SeriesInfo, RoutingDecision, ModelCard | None, Any, Any, Exception | None]] = []
        for series, decision in work:
            assert decision.model is not None
            try:
                model = self.registry.get(decision.model)
                card_json = model.card.model_dump(mode="json")
                refs = self._submit(card_json, series)
                pending.append((series, decision, model.card, card_json, refs, None))
            except Exception as exc:  # noqa: BLE001
                pending.append((series, decision, None, None, None, exc))
        results = []
        for series, decision, card, card_json, refs, error in pending:
            timings = StageTimings()
            version = card.version if card else ""
            if error is not None:
                transient, reason = classify_failure(error, self.timeout_s)
                results.append(
                    SeriesResult(
                        series.series_uid, decision.model or "", version, False, [], reason, timings, transient
                    )
                )
                continue
            fetch_ref, prepared_ref, load_ref, preprocess_ref, _ = refs
            stage = "load"
            try:
                # A hung worker must not hold an analysis thread for ever: each stage has a deadline. Only
                # timings and findings come back here; the volume stays in the object store.
                timings.add("load", float(self._get(fetch_ref)))
                stage = "preprocess"
                load_s, preprocess_s = self._get([load_ref, preprocess_ref])
                timings.add("load", load_s)
                timings.add("preprocess", preprocess_s)
                stage = "inference"
                slot = self._worker(decision.model)  # type: ignore[arg-type]
                raw_ref, seconds_ref = slot.actor.infer.options(num_returns=2).remote(prepared_ref)
                try:
                    seconds = self._ray.get(seconds_ref, timeout=self.timeout_s)
                except self._ray.exceptions.GetTimeoutError:
                    # An actor call cannot be force-cancelled: restart the worker, which ends the call.
                    with contextlib.suppress(Exception):
                        self._ray.kill(slot.actor, no_restart=False)
                    raise
                timings.add("inference", seconds)
                stage = "postprocess"
                post_ref = self._postprocess.remote(card_json, prepared_ref, raw_ref, series)
                findings, seconds = self._get(post_ref)
                timings.add("postprocess", seconds)
                results.append(SeriesResult(series.series_uid, card.name, version, True, findings, "", timings))  # type: ignore[union-attr]
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
                results.append(
                    SeriesResult(
                        series.series_uid, decision.model or "", version, False, [], reason, timings, transient
                    )
                )
        return results

    def close(self) -> None:
        for pool in self._workers.values():
            for slot in pool:
                with contextlib.suppress(Exception):
                    self._ray.kill(slot.actor)
        self._workers.clear()
        if not self.ray_settings.address:
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
