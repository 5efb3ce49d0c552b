"""Runners execute model pipelines on routed series: in-process (tests, `triage infer`) or on Ray (`triage serve`).

Both keep the same contract: one `SeriesResult` per routed series, never an exception for an AI failure, because
an AI failure must never remove a study from the worklist or lower its priority; the caller records it.
Ray is imported only in this module.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from triage.config import InferenceSettings, RaySettings
from triage.domain import Finding, RoutingDecision, SeriesInfo, SeriesResult, StageTimings
from triage.errors import TriageError
from triage.models.card import ModelCard
from triage.models.registry import ModelRegistry
from triage.models.runtime import OnnxModel, load_members
from triage.pipelines.base import ModelPipeline, pipeline_for

log = logging.getLogger(__name__)

Work = Sequence[tuple[SeriesInfo, RoutingDecision]]


class Runner(Protocol):
    def analyse(self, study_uid: str, work: Work) -> list[SeriesResult]: ...

    def warm_up(self) -> None: ...

    def close(self) -> None: ...


def _describe(exc: BaseException) -> str:
    """A one-line reason for the worklist; TriageErrors carry their own message, others get their type."""
    if isinstance(exc, TriageError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class InProcessRunner:
    """Runs every stage in the calling process. Sessions are loaded once per model and reused."""

    def __init__(self, registry: ModelRegistry, inference: InferenceSettings) -> None:
        self.registry = registry
        self.inference = inference
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
                loaded = pipeline.load(series)
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
                log.warning(
                    "study %s series %s: %s failed: %s", study_uid, series.series_uid, decision.model, _describe(exc)
                )
                log.debug("%s", traceback.format_exc())
                results.append(
                    SeriesResult(
                        series.series_uid,
                        decision.model,
                        card.version if card else "",
                        False,
                        [],
                        _describe(exc),
                        timings,
                    )
                )
        return results

    def close(self) -> None:
        self._loaded.clear()


# ---------------------------------------------------------------------------------------------- Ray


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    return fn(*args), time.perf_counter() - started


def _ray_preprocess(card_json: dict[str, Any], series: SeriesInfo) -> tuple[Any, float, float]:
    pipeline = pipeline_for(ModelCard.model_validate(card_json))
    loaded, load_s = _timed(pipeline.load, series)
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
        return {"members": len(self.members), "providers": self.members[0].providers, "load_s": self.load_s}

    def infer(self, prepared: Any) -> tuple[Any, float]:
        return _timed(self.pipeline.infer, prepared, self.members)


class RayRunner:
    """Runs preprocessing and post-processing as Ray CPU tasks and inference in long-lived actors.

    Starts a local Ray instance unless `RaySettings.address` names a cluster to join. Inference actors ask for
    GPUs when the cluster has them (`gpus_per_inference_worker`), so the same code scales from a laptop to a
    cluster of CPU and GPU nodes. Workers on other nodes need `triage` installed in the same version.
    """

    def __init__(self, registry: ModelRegistry, inference: InferenceSettings, ray_settings: RaySettings) -> None:
        import ray

        self._ray = ray
        self.registry = registry
        self.inference = inference
        self.ray_settings = ray_settings
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
            if ray_settings.address:
                ray.init(address=ray_settings.address, **kwargs)
            else:
                ray.init(num_cpus=ray_settings.num_cpus, **kwargs)
        self.has_gpu = ray.cluster_resources().get("GPU", 0) > 0
        # Studies live in this node's store, so reading and preprocessing run on this node; inference actors
        # and post-processing may run anywhere in the cluster.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self._preprocess = ray.remote(num_cpus=1, scheduling_strategy=here)(_ray_preprocess)  # type: ignore[call-overload]
        self._postprocess = ray.remote(num_cpus=1)(_ray_postprocess)
        self.timeout_s = inference.timeout_s
        gpus = ray_settings.gpus_per_inference_worker if self.has_gpu else 0
        # An actor holds its resources for life: by default it reserves no CPU, so preprocessing tasks are never
        # starved of a slot by idle inference workers (each model has one).
        self._actor_cls = ray.remote(num_gpus=gpus, num_cpus=ray_settings.cpus_per_inference_worker)(_InferenceWorker)
        self._actors: dict[str, list[Any]] = {}
        self._next: dict[str, int] = {}
        self._lock = threading.Lock()
        self.load_errors: dict[str, str] = {}

    def _actor(self, name: str) -> Any:
        with self._lock:
            if name not in self._actors:
                model = self.registry.get(name)
                model.verify()  # refuse mismatched weights before any worker starts
                self._actors[name] = [
                    self._actor_cls.remote(str(self.registry.weights_dir), name, self.inference.model_dump())
                    for _ in range(max(1, self.ray_settings.inference_workers))
                ]
                self._next[name] = 0
            pool = self._actors[name]
            actor = pool[self._next[name] % len(pool)]
            self._next[name] += 1
            return actor

    def warm_up(self) -> None:
        """Start the inference actors of every installed model and wait until their sessions are loaded."""
        for name in self.registry.names():
            try:
                info = self._ray.get(self._actor(name).describe.remote())
                log.info("inference worker for %s ready: %s", name, info)
            except Exception as exc:  # noqa: BLE001 - a model that cannot load is reported, the service runs on
                self.load_errors[name] = _describe(exc)
                log.error("model %s cannot be loaded: %s", name, _describe(exc))
                with self._lock:
                    self._actors.pop(name, None)

    def analyse(self, study_uid: str, work: Work) -> list[SeriesResult]:
        pending: list[tuple[SeriesInfo, RoutingDecision, ModelCard | None, Any, Any, Exception | None]] = []
        for series, decision in work:
            assert decision.model is not None
            try:
                model = self.registry.get(decision.model)
                card_json = model.card.model_dump(mode="json")
                prepared_ref = self._preprocess.remote(card_json, series)
                pending.append((series, decision, model.card, card_json, prepared_ref, None))
            except Exception as exc:  # noqa: BLE001
                pending.append((series, decision, None, None, None, exc))
        results = []
        for series, decision, card, card_json, prepared_ref, error in pending:
            timings = StageTimings()
            version = card.version if card else ""
            if error is not None:
                results.append(
                    SeriesResult(series.series_uid, decision.model or "", version, False, [], _describe(error), timings)
                )
                continue
            try:
                # A hung worker must not hold an analysis thread for ever: each stage has a deadline.
                prepared, load_s, preprocess_s = self._ray.get(prepared_ref, timeout=self.timeout_s)
                timings.add("load", load_s)
                timings.add("preprocess", preprocess_s)
                actor = self._actor(decision.model)  # type: ignore[arg-type]
                raw, seconds = self._ray.get(actor.infer.remote(prepared), timeout=self.timeout_s)
                timings.add("inference", seconds)
                post_ref = self._postprocess.remote(card_json, prepared, raw, series)
                findings, seconds = self._ray.get(post_ref, timeout=self.timeout_s)
                timings.add("postprocess", seconds)
                results.append(SeriesResult(series.series_uid, card.name, version, True, findings, "", timings))  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - an AI failure is recorded, never raised to the worklist
                cause = getattr(exc, "cause", None) or exc  # Ray wraps task errors; report the original
                log.warning(
                    "study %s series %s: %s failed: %s", study_uid, series.series_uid, decision.model, _describe(cause)
                )
                results.append(
                    SeriesResult(series.series_uid, decision.model or "", version, False, [], _describe(cause), timings)
                )
        return results

    def close(self) -> None:
        for pool in self._actors.values():
            for actor in pool:
                self._ray.kill(actor)
        self._actors.clear()
        if not self.ray_settings.address:
            self._ray.shutdown()


def make_runner(kind: str, registry: ModelRegistry, inference: InferenceSettings, ray_settings: RaySettings) -> Runner:
    """`kind` is "ray" (the service) or "inprocess" (tests and `triage infer`)."""
    if kind == "ray":
        return RayRunner(registry, inference, ray_settings)
    if kind == "inprocess":
        return InProcessRunner(registry, inference)
    raise TriageError(f"unknown runner {kind!r}; valid: 'ray', 'inprocess'")
