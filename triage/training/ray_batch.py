"""Batch evaluation on a Ray cluster with Ray Data: labelled studies scored by actors that load the model once each.

For a site's thousands of studies `triage models evaluate --ray` spreads the scoring over the cluster's nodes
(`--ray-address`, or TRIAGE_RAY__ADDRESS; a local Ray instance without one). Each actor runs the same
preprocess -> ONNX -> postprocess as the service (`triage.training.evaluate.score_case`). The only module of
`triage.training` allowed to import Ray (see the import-linter contract in pyproject.toml).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from triage.models.registry import InstalledModel
from triage.training.datasets import LabelledCase

log = logging.getLogger(__name__)


class _Scorer:
    """A Ray Data actor: loads the model's sessions once, then scores batches of cases."""

    def __init__(self, weights_dir: str, name: str, version: str, providers: list[str], members: int) -> None:
        from triage.models.registry import ModelRegistry
        from triage.models.runtime import load_members
        from triage.pipelines.base import pipeline_for

        model = ModelRegistry(Path(weights_dir)).get(name, version)
        self.card = model.card
        self.pipeline = pipeline_for(model.card)
        self.sessions = load_members(model, providers, members)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from triage.errors import TriageError
        from triage.training.evaluate import score_case

        label = self.card.findings[0].label
        probabilities, errors = [], []
        for case_id, path, truth in zip(batch["case_id"], batch["path"], batch["label"], strict=True):
            case = LabelledCase(str(case_id), Path(str(path)), int(truth))
            try:
                probabilities.append(score_case(case, self.pipeline, self.sessions, self.card.inputs.modality, label))
                errors.append("")
            except TriageError as exc:
                probabilities.append(float("nan"))
                errors.append(str(exc))
        return {
            "case_id": np.asarray(batch["case_id"]),
            "probability": np.asarray(probabilities, dtype=float),
            "error": np.asarray(errors, dtype=object),
        }


def score_on_ray(
    model: InstalledModel,
    cases: Sequence[LabelledCase],
    providers: Sequence[str],
    members: int = 0,
    address: str | None = None,
    concurrency: int = 1,
    batch_size: int = 8,
) -> list[tuple[str, float | None, str]]:
    """Score `cases` with Ray Data; returns (case_id, probability or None, error) in the order of `cases`.

    Args:
        address: a Ray cluster to join ("auto", "ray://...", host:port); None starts a local instance.
        concurrency: actors (each takes one CPU and loads the model once).
    """
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        ray.init(address=address or "local", **kwargs)
    try:
        rows = [{"case_id": c.case_id, "path": str(c.path), "label": int(c.label)} for c in cases]
        dataset = ray.data.from_items(rows).map_batches(
            _Scorer,
            fn_constructor_kwargs={
                "weights_dir": str(model.directory.parent.parent),
                "name": model.card.name,
                "version": model.card.version,
                "providers": list(providers),
                "members": members,
            },
            batch_size=batch_size,
            concurrency=concurrency,
            num_cpus=1,
        )
        scored = {str(r["case_id"]): r for r in dataset.take_all()}
    finally:
        if started_here:
            ray.shutdown()
    out: list[tuple[str, float | None, str]] = []
    for case in cases:
        row = scored.get(case.case_id)
        if row is None:
            out.append((case.case_id, None, "not scored by the Ray Data job"))
            continue
        probability = float(row["probability"])
        out.append((case.case_id, None if np.isnan(probability) else probability, str(row["error"])))
    log.info("Ray Data scored %d cases with %d actor(s)", len(out), concurrency)
    return out
