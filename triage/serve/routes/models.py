"""GET /api/v1/models: the installed models with their cards and whether they can run."""

from __future__ import annotations

from fastapi import APIRouter

from triage.serve.deps import Service
from triage.serve.schemas import ModelInfo
from triage.worklist.priority import may_raise

router = APIRouter(tags=["models"])


@router.get("/models", response_model=list[ModelInfo], summary="Installed models with their cards")
def models(service: Service) -> list[ModelInfo]:
    workers = getattr(service.runner, "worker_info", {})
    return [
        ModelInfo(
            name=m.card.name,
            version=m.card.version,
            task=m.card.task,
            synthetic=m.card.synthetic,
            raises_priority=may_raise(m.card.name, m.card.synthetic, service.settings.priority),
            summary=m.card.summary,
            licence=m.card.licence,
            error=service.unavailable.get(m.card.name),
            workers=workers.get(m.card.name, []),
        )
        for m in service.registry.all()
    ]
