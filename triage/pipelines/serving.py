"""Ray Serve deployments of installed model versions: ONNX sessions loaded once per replica, inputs batched.

One application per installed model version (`ct-head-ich-1.0.0`), reached only through deployment handles from
the runner: Serve runs no HTTP proxy for them. A replica loads the version's ensemble members in its constructor,
so a replica that cannot load its model never becomes healthy and Serve keeps trying to start one. Requests carry
a whole prepared series; the replica cuts it into the graph's items (one radiograph, or the kept tiles of a head
CT) and sends them through one `@serve.batch` queue, so items of one study and of concurrent studies run through
the members together. The ONNX runs happen in a worker thread: the replica's event loop stays free for Serve's
health checks and for cancellation while a long head CT runs.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve

from triage.config import DeploymentSettings, InferenceSettings, RaySettings
from triage.models.card import ModelCard
from triage.models.registry import ModelRegistry
from triage.models.runtime import load_members
from triage.pipelines.base import pipeline_for, run_members


def application_name(card: ModelCard) -> str:
    """The Serve application (and deployment) of one model version: `<name>-<version>`."""
    return f"{card.name}-{card.version}"


class ModelReplica:
    """The body of one replica of a model version's deployment."""

    def __init__(self, weights_dir: str, name: str, version: str, inference: dict[str, Any], batch: dict[str, Any]):
        settings = InferenceSettings.model_validate(inference)
        started = time.perf_counter()
        # The deployment serves one version (two versions of a model can run side by side: the one in use and a
        # new one in shadow); raises NotFoundError when that version is not installed on this node.
        model = ModelRegistry(Path(weights_dir)).get(name, version)
        self.card = model.card
        self.pipeline = pipeline_for(model.card)
        self.members = load_members(
            model,
            settings.providers,
            settings.ensemble_members,
            settings.intra_op_threads,
            fp16=settings.fp16,
            trt_cache_dir=settings.trt_cache_dir,
            bf16=settings.bf16,
        )
        self.load_s = time.perf_counter() - started
        deployment = DeploymentSettings.model_validate(batch)
        self.run_batch.set_max_batch_size(deployment.max_batch_size)  # type: ignore[attr-defined]
        self.run_batch.set_batch_wait_timeout_s(deployment.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self.node_id = ray.get_runtime_context().get_node_id()

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def run_batch(self, items: list[Any]) -> list[Any]:
        """Every member once over the batch (in a worker thread); one member-folded output per item."""
        return await asyncio.to_thread(run_members, self.members, items, self.pipeline.reduce_members)

    async def infer(self, prepared: Any) -> tuple[Any, float, str]:
        """Run the model on one prepared series.

        Returns:
            (raw result for post-processing, seconds in this replica, the Ray node ID it ran on).
        """
        started = time.perf_counter()
        items, context = await asyncio.to_thread(self.pipeline.model_inputs, prepared)
        reduced = await asyncio.gather(*(self.run_batch(item) for item in items))
        raw = await asyncio.to_thread(self.pipeline.assemble, prepared, context, list(reduced), self.members)
        return raw, time.perf_counter() - started, self.node_id

    def describe(self) -> dict[str, Any]:
        """What the models API shows of this replica."""
        return {
            "model": self.card.name,
            "version": self.card.version,
            "members": len(self.members),
            "providers": self.members[0].providers,
            "precision": self.members[0].precision,
            "load_s": round(self.load_s, 3),
            "pid": os.getpid(),
            "node_id": self.node_id,
            "fixed_batch": self.members[0].fixed_batch,
        }

    def check_health(self) -> None:
        """Serve's periodic check: a replica whose sessions are gone is replaced.

        Raises:
            RuntimeError: when no ensemble member is loaded.
        """
        if not self.members:
            raise RuntimeError(f"{self.card.key}: no ensemble member loaded")


def build_application(
    weights_dir: Path, card: ModelCard, inference: InferenceSettings, ray_settings: RaySettings, use_gpu: bool
) -> Any:
    """The Serve application of one installed model version, with the site's replica and batching settings."""
    deployment = ray_settings.deployment_for(card.name)
    actor_options: dict[str, Any] = {"num_cpus": ray_settings.cpus_per_inference_worker}
    if use_gpu:
        actor_options["num_gpus"] = ray_settings.gpus_per_inference_worker
    if ray_settings.inference_resources:
        actor_options["resources"] = dict(ray_settings.inference_resources)
    options: dict[str, Any] = {
        "name": application_name(card),
        "max_ongoing_requests": deployment.max_ongoing_requests,
        "health_check_period_s": ray_settings.health_check_period_s,
        "health_check_timeout_s": ray_settings.health_check_timeout_s,
        "ray_actor_options": actor_options,
        # Health checks and describe calls would fill the log; failures are logged by the runner.
        "logging_config": {"enable_access_log": False},
    }
    if deployment.min_replicas >= deployment.max_replicas:
        options["num_replicas"] = deployment.min_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": deployment.min_replicas,
            "initial_replicas": deployment.min_replicas,
            "max_replicas": deployment.max_replicas,
            "target_ongoing_requests": deployment.target_ongoing_requests,
        }
    return (
        serve.deployment(ModelReplica)  # type: ignore[attr-defined]
        .options(**options)
        .bind(str(weights_dir), card.name, card.version, inference.model_dump(mode="json"), deployment.model_dump())
    )
