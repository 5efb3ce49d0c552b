"""Prometheus metrics of the models' live behaviour (prometheus-client), served at /metrics to signed-in callers.

Per model version and site: the flag rate and studies in the drift window, and the drift alerts open now. Each
service keeps its own registry so that several services in one process (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from triage.worklist.monitoring import DriftAlert

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LABELS = ("model", "version", "site", "shadow")


class ModelMetrics:
    """Gauges updated by each drift check."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.flag_rate = Gauge(
            "triage_model_flag_rate", "Fraction of analysed studies flagged in the drift window", _LABELS,
            registry=self.registry,
        )  # fmt: skip
        self.studies = Gauge(
            "triage_model_studies", "Studies analysed in the drift window", _LABELS, registry=self.registry
        )
        self.alerts = Gauge(
            "triage_model_drift_alerts", "Drift alerts open now, by kind", ("model", "version", "site", "kind"),
            registry=self.registry,
        )  # fmt: skip

    def update(self, activity: Sequence[dict[str, Any]], alerts: Iterable[DriftAlert]) -> None:
        self.flag_rate.clear()
        self.studies.clear()
        self.alerts.clear()
        for row in activity:
            labels = (row["model"], row["version"], row["site"], str(row["shadow"]).lower())
            self.studies.labels(*labels).set(row["studies"])
            if row["flag_rate"] is not None:
                self.flag_rate.labels(*labels).set(row["flag_rate"])
        for alert in alerts:
            self.alerts.labels(alert.model, alert.version, alert.site, alert.kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
