"""GET /api/v1/models: the installed models with their cards, their states per site and whether they can run."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from triage.domain import utcnow
from triage.models.card import ModelCard
from triage.models.states import ANY_SITE, ModelState
from triage.serve.deps import Exporter, Service
from triage.serve.schemas import ModelInfo, ModelSiteState

router = APIRouter(tags=["models"])


@router.get("/models", response_model=list[ModelInfo], summary="Installed models, their cards and states per site")
def models(service: Service) -> list[ModelInfo]:
    workers = getattr(service.runner, "worker_info", {})
    by_key: dict[tuple[str, str], list[ModelSiteState]] = {}
    for state in service.model_states.status():
        by_key.setdefault((state.model, state.version), []).append(
            ModelSiteState(
                site=state.site,
                state=state.state.value,
                reason=state.reason,
                source=state.source,
                threshold=state.threshold,
                changed_by=state.changed_by,
                changed_at=state.changed_at.isoformat() if state.changed_at else None,
            )
        )
    return [
        ModelInfo(
            name=m.card.name,
            version=m.card.version,
            task=m.card.task,
            synthetic=m.card.synthetic,
            validation=m.card.validation.status,
            raises_priority=any(
                s.site == ANY_SITE and s.state == ModelState.ACTIVE for s in by_key.get(_key(m.card), [])
            ),
            states=by_key.get(_key(m.card), []),
            summary=m.card.summary,
            licence=m.card.licence,
            error=service.unavailable.get(m.card.name),
            workers=workers.get(m.card.name, []),
        )
        for m in service.registry.all()
    ]


def _key(card: ModelCard) -> tuple[str, str]:
    return card.name, card.version


@router.get(
    "/models/monitor",
    summary="Each model's live behaviour per site (flag rate, agreement, latency) and the open drift alerts",
)
def monitor(service: Service, user: Exporter) -> dict[str, Any]:
    current, alerts = service.measure_models(utcnow())
    return {
        "activity": [a.to_dict() for a in current],
        "alerts": [a.to_dict() for a in alerts],
        "window_h": service.settings.models.drift_window_h,
        "baseline_days": service.settings.models.drift_baseline_days,
    }
