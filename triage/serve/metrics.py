"""Prometheus metrics (prometheus-client), served at /metrics to signed-in callers and service tokens.

The service's own (`ServiceMetrics`: instances received and refused, stage durations per model, studies by AI
status, queue and outbox depth, delivery failures, alerts sent) and the models' live behaviour (`ModelMetrics`:
per model version and site, the flag rate and studies in the drift window, the drift alerts open now). Each
service keeps its own registry so that several services in one process (tests) do not collide.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from triage.worklist.alerts import ALERT, ESCALATION
from triage.worklist.monitoring import DriftAlert
from triage.worklist.outbox import DELIVERED, FAILED, PENDING, OutboxRow
from triage.worklist.tables import Study

log = logging.getLogger(__name__)

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


# Seconds: a radiograph's stages take tens of milliseconds, a head CT's inference minutes on CPU.
_STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class ServiceMetrics:
    """What an operator watches: instances received and refused (by reason) by this process, analysis stage
    durations per model, and from the shared database at each scrape the studies by AI status, the analysis queue,
    the outbox per destination (waiting, retried, failed) and the critical alerts sent.

    The database figures are the whole deployment's (every process sees the same); the counters are this
    process's own (Prometheus sums them over the processes it scrapes).
    """

    def __init__(self, registry: CollectorRegistry, engine: Engine) -> None:
        self.received = Counter(
            "triage_instances_received_total", "Instances stored (durable), by how they came", ("source",),
            registry=registry,
        )  # fmt: skip
        self.refused = Counter(
            "triage_instances_refused_total", "Instances refused, by how they came and why", ("source", "reason"),
            registry=registry,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "triage_analysis_stage_seconds", "Seconds per analysis stage of one series, per model",
            ("model", "stage"), buckets=_STAGE_BUCKETS, registry=registry,
        )  # fmt: skip
        registry.register(_DatabaseCollector(engine))

    def observe_stages(self, results: Iterable[Any]) -> None:
        """Record the stage durations of one analysis (its `SeriesResult`s, each with its model's timings)."""
        for result in results:
            for stage, seconds in result.timings.seconds.items():
                self.stage_seconds.labels(result.model, stage).observe(seconds)


class _DatabaseCollector(Collector):
    """Gauges read from the worklist database when Prometheus scrapes (one small query each)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        try:
            with Session(self.engine) as session:
                by_status = session.execute(
                    select(Study.ai_status, func.count()).where(Study.reported_at.is_(None)).group_by(Study.ai_status)
                ).all()
                outbox = session.execute(
                    select(OutboxRow.channel, OutboxRow.destination, OutboxRow.status, OutboxRow.attempts > 0,
                           func.count())
                    .where(OutboxRow.status != DELIVERED)
                    .group_by(OutboxRow.channel, OutboxRow.destination, OutboxRow.status, OutboxRow.attempts > 0)
                ).all()  # fmt: skip
                alerts = session.execute(
                    select(OutboxRow.channel, OutboxRow.kind, func.count())
                    .where(OutboxRow.status == DELIVERED, OutboxRow.kind.in_((ALERT, ESCALATION)))
                    .group_by(OutboxRow.channel, OutboxRow.kind)
                ).all()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the database is restarting
            log.warning("metrics: database figures not read: %s", type(exc).__name__)
            return
        studies = GaugeMetricFamily("triage_studies", "Open studies by AI status", labels=["ai_status"])
        for status, count in by_status:
            studies.add_metric([status], count)
        yield studies
        queue = GaugeMetricFamily("triage_analysis_queue_depth", "Open studies waiting for or in AI analysis")
        queue.add_metric([], sum(n for status, n in by_status if status in ("pending", "analysing")))
        yield queue
        depth = GaugeMetricFamily(
            "triage_outbox_depth", "Messages waiting to be delivered", labels=["channel", "destination"]
        )
        retrying = GaugeMetricFamily(
            "triage_outbox_retrying", "Waiting messages whose delivery failed at least once",
            labels=["channel", "destination"],
        )  # fmt: skip
        failed = GaugeMetricFamily(
            "triage_outbox_failed", "Messages the destination refused for good", labels=["channel", "destination"]
        )
        totals: dict[tuple[str, str, str], int] = {}
        for channel, destination, status, tried, count in outbox:
            if status == PENDING:
                totals[("depth", channel, destination)] = totals.get(("depth", channel, destination), 0) + count
                if tried:
                    totals[("retrying", channel, destination)] = count
            elif status == FAILED:
                totals[("failed", channel, destination)] = count
        for (kind, channel, destination), count in totals.items():
            {"depth": depth, "retrying": retrying, "failed": failed}[kind].add_metric([channel, destination], count)
        yield depth
        yield retrying
        yield failed
        sent = CounterMetricFamily("triage_alerts_sent", "Critical alerts delivered", labels=["channel", "kind"])
        for channel, kind, count in alerts:
            sent.add_metric([channel, kind], count)
        yield sent
