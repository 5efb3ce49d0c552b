"""The running service: wires the store, the SCP, the worklist, the models and the runner, and watches for
complete studies (no instance for `stable_age_s`) to send them to the pipeline. One process runs any of the
roles (API, ingest, analysis); they share nothing but the database and the store.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any

from pydicom import Dataset

from triage.analysis import AnalysisOutcome, RetryPolicy, analyse_study
from triage.config import ALL_ROLES, ServiceRole, Settings
from triage.dicom.results import reportable, study_results
from triage.dicom.scp import StorageSCP
from triage.dicom.store import DicomStore, StoredInstance, StorePolicy
from triage.domain import InstanceMeta, utcnow
from triage.errors import TriageError
from triage.hl7.mllp import MLLPServer
from triage.models.registry import InstalledModel, ModelRegistry
from triage.pipelines.routing import RoutingRules
from triage.pipelines.runner import Runner, make_runner
from triage.serve.delivery import (
    DICOM,
    HL7,
    DicomResultsDeliverer,
    EmailDeliverer,
    Hl7Deliverer,
    WebhookDeliverer,
    order_handler,
    results_destination,
    server_tls,
)
from triage.serve.metrics import ModelMetrics, ServiceMetrics
from triage.storage import LocalStore
from triage.worklist.accounts import Accounts
from triage.worklist.alerts import ALERT, EMAIL, ESCALATION, WEBHOOK
from triage.worklist.db import create_engine_for, migrate
from triage.worklist.events import Broadcaster, relay_for
from triage.worklist.model_states import ModelStates
from triage.worklist.monitoring import Activity, DriftAlert, activity, drift, windows
from triage.worklist.outbox import Deliverer, Outbox
from triage.worklist.repository import Worklist

log = logging.getLogger(__name__)


class TriageService:
    """Everything `triage serve` runs besides HTTP, for the roles it is given. Start once, stop once.

    ingest: the Storage SCP (unless `start_scp` is False) and, at start, indexing files the store holds but
    the index lacks. analysis: the runner, the model health probe and the scheduler that claims ready studies.
    api: nothing beyond the database, the store and the model registry that every role has.
    """

    def __init__(
        self,
        settings: Settings,
        runner_kind: str = "ray",
        start_scp: bool = True,
        roles: frozenset[ServiceRole] = ALL_ROLES,
    ) -> None:
        self.settings = settings
        self.roles = frozenset(roles)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        # The one place that knows where things live: everything else names instances and overlays by key.
        self.files = LocalStore(settings.store_dir, settings.overlay_dir)
        url = settings.resolved_database_url
        migrate(url)
        self.events = Broadcaster()
        self.worklist = Worklist(
            create_engine_for(url),
            settings.priority,
            events=self.events,
            sender_priority=settings.dicom.sender_priority,
        )
        # On PostgreSQL, changes made by any process reach this one's subscribers (LISTEN/NOTIFY); on SQLite
        # (one process) the in-memory broadcaster is all there is.
        self.events_relay = relay_for(self.worklist.engine, self.events)
        self.store = DicomStore(
            self.files,
            settings.ensure_phi_salt(),
            index=self._index,
            policy=StorePolicy.from_settings(settings.dicom),
            index_many=self._index_many,
        )
        # What triage sends out goes through the outbox (written with the change, delivered by the analysis role).
        deliverers: dict[str, Deliverer] = {}
        if settings.hl7.ris_host:
            self.worklist.hl7_destination = f"{settings.hl7.ris_host}:{settings.hl7.ris_port}"
            deliverers[HL7] = Hl7Deliverer(settings.hl7)
        self.worklist.alert_settings = settings.alerts
        self.worklist.results_destination = results_destination(settings.results)
        deliverers[DICOM] = DicomResultsDeliverer(self.worklist, self.files, settings.results, self.finding_codes)
        deliverers[WEBHOOK] = WebhookDeliverer(settings.alerts)
        if settings.alerts.smtp_host:
            deliverers[EMAIL] = EmailDeliverer(settings.alerts)
        self.outbox = Outbox(
            self.worklist.engine,
            deliverers,
            settings.outbox.retry_base_s,
            settings.outbox.retry_max_s,
            audited_kinds=frozenset({ALERT, ESCALATION}),
            give_up_after_s=settings.outbox.give_up_after_h * 3600,
            lease_s=settings.outbox.lease_s,
        )
        self._outbox_thread: threading.Thread | None = None
        self.hl7_listener: MLLPServer | None = None
        self.registry = ModelRegistry(settings.weights_dir)
        self.model_states = ModelStates(self.worklist.engine, self.registry, settings.models)
        self.rules = RoutingRules.load(settings.routing_rules)
        self.runner_kind = runner_kind
        self.runner: Runner | None = None
        self.scp = StorageSCP(settings.dicom, self.accept) if start_scp and ServiceRole.INGEST in self.roles else None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        # Studies are claimed from the database (a lease per analysis), so several schedulers never analyse
        # the same study twice; this process analyses at most `analysis.concurrency` at once.
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self._pool = ThreadPoolExecutor(max_workers=settings.analysis.concurrency, thread_name_prefix="analysis")
        self._last_lease_renewal = 0.0
        self._health_thread: threading.Thread | None = None
        # Each model's state from the last health probe: None when it can run, else why not.
        self.model_health: dict[str, str | None] = {}
        self._running: dict[str, Future[AnalysisOutcome]] = {}
        self._lock = threading.Lock()
        self.outcomes: list[AnalysisOutcome] = []
        self.model_errors: dict[str, str] = {}
        self.ready = False
        self._reindexing = False
        # Drift watch: the last check's alerts and each model's activity per site in the recent window.
        self.metrics = ModelMetrics()
        self.service_metrics = ServiceMetrics(self.metrics.registry, self.worklist.engine)
        self.drift_alerts: list[DriftAlert] = []
        self.model_activity: list[dict[str, Any]] = []
        self._alerted: set[tuple[str, str, str, str]] = set()
        self._drift_thread: threading.Thread | None = None
        self._claims_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ ingest
    def _index(self, meta: InstanceMeta) -> bool:
        received_at = utcnow()
        if self._reindexing:
            # Files found on disk at start-up arrived before the restart: their waiting time counts from then.
            received_at = self.files.modified_at(meta.key)
        return self.worklist.record_instance(meta, received_at)

    def _index_many(self, metas: Sequence[InstanceMeta]) -> list[bool]:
        """Index a batch of received instances in one transaction (the store's group commit)."""
        received_at = utcnow()
        return self.worklist.record_instances([(meta, received_at) for meta in metas])

    def accept(self, ds: Dataset, calling_ae: str = "", encoded: bytes | None = None) -> StoredInstance:
        """Store and index one instance; returns only once it is durable (the sender may then hear success).
        `encoded`: the data set's bytes as received, stored as they are (see `DicomStore.write`)."""
        try:
            stored = self.store.write(ds, calling_ae, encoded)
        except TriageError as exc:
            self.service_metrics.refused.labels("dicom", type(exc).__name__).inc()
            raise
        self.service_metrics.received.labels("dicom").inc()
        return stored

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.events_relay is not None and not self.events_relay.start():
            log.warning("change events from other processes are not received yet; retrying in the background")
        for problem in self.registry.problems:
            log.error("model registry: %s", problem)
        broken: dict[str, list[tuple[InstalledModel, str]]] = {}
        for model in self.registry.all():
            try:
                model.verify()
            except Exception as exc:  # noqa: BLE001 - refuse that model, keep serving the others
                broken.setdefault(model.card.name, []).append((model, str(exc)))
                log.error("%s", exc)
        for name, failures in broken.items():
            if len(failures) == len([m for m in self.registry.all() if m.card.name == name]):
                self.model_errors[name] = failures[0][1]  # no version of it can run
                continue
            # Another version of the model is sound: refuse only the broken ones (a corrupt new version on
            # trial must not stop the version in use).
            for model, problem in failures:
                self.registry.exclude(model, problem)
        if ServiceRole.INGEST in self.roles:
            self._start_ingest()
        if ServiceRole.ANALYSIS in self.roles:
            self._start_analysis()
        log.info("service started with roles: %s", ", ".join(sorted(self.roles)))
        self.ready = True

    def _start_ingest(self) -> None:
        # Files written before a crash but not yet indexed are indexed now: no received study is lost.
        self.store.remove_stale_temp_files()
        self._reindexing = True
        try:
            new, _, unreadable = self.store.reindex()
        finally:
            self._reindexing = False
        if new or unreadable:
            log.warning(
                "start-up: indexed %d stored instance(s) missing from the index; %d unreadable", new, unreadable
            )
        if self.scp is not None:
            self.scp.start()
            log.info("DICOM SCP %s listening on port %s", self.settings.dicom.ae_title, self.scp.port)
        hl7 = self.settings.hl7
        if hl7.port:
            handle = order_handler(lambda order: self.worklist.record_order(order, utcnow()), self.store.salt)
            self.hl7_listener = MLLPServer(hl7.host, hl7.port, handle, ssl_context=server_tls(hl7))
            self.hl7_listener.start()
            tls = " (TLS)" if hl7.certfile else ""
            log.info("HL7 order listener on %s:%s%s", hl7.host, self.hl7_listener.port, tls)

    def _start_analysis(self) -> None:
        self.worklist.recover_interrupted(utcnow(), is_dead=self._not_running_here)
        self.runner = make_runner(
            self.runner_kind, self.registry, self.settings.inference, self.settings.ray, source=self.files
        )
        self.runner.warm_up()
        self.model_errors.update(getattr(self.runner, "load_errors", {}))
        self.check_models()
        self._watcher = threading.Thread(target=self._watch, name="study-watcher", daemon=True)
        self._watcher.start()
        self._health_thread = threading.Thread(target=self._watch_models, name="model-health", daemon=True)
        self._health_thread.start()
        self._drift_thread = threading.Thread(target=self._watch_drift, name="model-drift", daemon=True)
        self._drift_thread.start()
        self._claims_thread = threading.Thread(target=self._watch_claims, name="idle-claims", daemon=True)
        self._claims_thread.start()
        self._outbox_thread = threading.Thread(target=self._watch_outbox, name="outbox", daemon=True)
        self._outbox_thread.start()

    def stop(self) -> None:
        self.ready = False
        self._stop.set()
        if self.scp is not None:
            self.scp.stop()
        if self.hl7_listener is not None:
            self.hl7_listener.stop()
        self.store.close()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        if self._health_thread is not None:
            self._health_thread.join(timeout=5)
        if self._drift_thread is not None:
            self._drift_thread.join(timeout=5)
        if self._claims_thread is not None:
            self._claims_thread.join(timeout=5)
        if self._outbox_thread is not None:
            self._outbox_thread.join(timeout=35)
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.runner is not None:
            self.runner.close()
        if self.events_relay is not None:
            self.events_relay.stop()

    # ------------------------------------------------------------------ outbox
    def _watch_outbox(self) -> None:
        while not self._stop.wait(self.settings.outbox.interval_s):
            try:
                self.worklist.escalate_alerts(utcnow())
            except Exception:  # noqa: BLE001 - an escalation error must not stop delivery
                log.exception("alert escalation failed")
            try:
                self.outbox.deliver_due(utcnow())
            except Exception:  # noqa: BLE001 - delivery must outlive any single failure (the database restarting)
                log.exception("outbox delivery failed")

    # ------------------------------------------------------------------ idle claims
    def _watch_claims(self) -> None:
        while not self._stop.wait(self.settings.reading.idle_check_s):
            try:
                self.release_idle_claims()
            except Exception:  # noqa: BLE001 - the watch must outlive any single failure
                log.exception("releasing idle claims failed")

    def release_idle_claims(self, now: datetime | None = None) -> list[str]:
        """Give back claims idle past their site's limit (each noted in the study's history and audited)."""
        released = self.worklist.release_idle_claims(now or utcnow(), self.settings.reading.claim_idle_min)
        if released:
            accounts = Accounts(self.worklist.engine)
            for study_uid in released:
                accounts.audit("triage", "claim-released-idle", now or utcnow(), study_uid)
            log.info("released %d idle claim(s)", len(released))
        return released

    # ------------------------------------------------------------------ drift watch
    def _watch_drift(self) -> None:
        while not self._stop.wait(self.settings.models.drift_interval_s):
            try:
                self.check_drift()
            except Exception:  # noqa: BLE001 - the watch must outlive any single failure
                log.exception("model drift check failed")

    def measure_models(self, now: datetime) -> tuple[list[Activity], list[DriftAlert]]:
        """Each model's activity per site in the recent window and the drift alerts (no side effects)."""
        models = self.settings.models
        recent, baseline = windows(now, models.drift_window_h, models.drift_baseline_days)
        current = activity(self.worklist.engine, *recent)
        alerts = drift(
            current,
            activity(self.worklist.engine, *baseline),
            self.model_states.expected_flag_rates(),
            models.drift_min_studies,
        )
        return current, alerts

    def check_drift(self, now: datetime | None = None) -> list[DriftAlert]:
        """Compare each model's recent window per site with its baseline and its validation report.

        A new alert is logged (no patient data: model, site and rates only), written to the audit log as
        `model-drift` and counted in the metrics; it is raised again only after it cleared.
        """
        now = now or utcnow()
        current, alerts = self.measure_models(now)
        keys = {(a.model, a.version, a.site, a.kind) for a in alerts}
        accounts = Accounts(self.worklist.engine)
        for alert in alerts:
            if (alert.model, alert.version, alert.site, alert.kind) in self._alerted:
                continue
            log.warning("model drift: %s", alert.message)
            accounts.audit("triage", "model-drift", now, detail=alert.to_dict())
        self._alerted = keys
        self.drift_alerts = alerts
        self.model_activity = [a.to_dict() for a in current]
        self.metrics.update(self.model_activity, alerts)
        return alerts

    # ------------------------------------------------------------------ model health
    def _watch_models(self) -> None:
        while not self._stop.wait(max(0.5, self.settings.inference.health_interval_s)):
            try:
                self.check_models()
            except Exception:  # noqa: BLE001 - the probe must outlive any single failure
                log.exception("model health check failed")

    def check_models(self) -> dict[str, str | None]:
        """Probe every model's workers (the runner replaces dead ones) and re-queue studies that failed for a
        transient reason once their model can run again: at start for all healthy models, later for each model
        that was not healthy at the previous probe and is now."""
        assert self.runner is not None
        previous = self.model_health
        state = self.runner.health()
        for name, problem in state.items():
            if problem and previous.get(name) != problem:
                log.error("model %s cannot run now: %s", name, problem)
            elif not problem and previous.get(name):
                log.warning("model %s can run again", name)
        self.model_health = state
        first = not previous
        recovered = [n for n, p in state.items() if p is None and (first or previous.get(n))]
        if recovered:
            self.worklist.requeue_transient_failures(
                utcnow(), self.settings.inference.max_auto_requeues, models=recovered
            )
        return state

    @property
    def unavailable(self) -> dict[str, str]:
        """Models that cannot run now, with the reason: refused at start, or failing their health probe."""
        out = dict(self.model_errors)
        out.update({name: problem for name, problem in self.model_health.items() if problem})
        return out

    # ------------------------------------------------------------------ study completion
    def _watch(self) -> None:
        """Poll for studies that have been stable for `stable_age_s` and analyse them (at most one run per study)."""
        period_s = max(0.2, min(1.0, self.settings.dicom.stable_age_s / 4))
        while not self._stop.wait(period_s):
            try:
                self.dispatch_ready()
            except Exception:  # noqa: BLE001 - the watcher must outlive any single failure
                log.exception("study watcher iteration failed")

    def _not_running_here(self, worker: str, study_uid: str) -> bool:
        """Whether an analysis run of `worker` is certainly dead: a process on this host that no longer exists,
        or this process when it is not analysing that study (its thread died)."""
        host, _, pid_text = worker.rpartition(":")
        if host != socket.gethostname() or not pid_text.isdigit():
            return False  # another host's process: its lease decides
        pid = int(pid_text)
        if pid == os.getpid():
            with self._lock:
                running = self._running.get(study_uid)
            return running is None or running.done()
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _keep_claims(self) -> None:
        """Renew the leases of the studies this process is analysing and take back those of dead processes."""
        lease_s = self.settings.analysis.lease_s
        if time.monotonic() - self._last_lease_renewal < lease_s / 3:
            return
        self._last_lease_renewal = time.monotonic()
        with self._lock:
            in_flight = [uid for uid, future in self._running.items() if not future.done()]
        self.worklist.renew_leases(self.worker_id, in_flight, utcnow(), lease_s)
        self.worklist.recover_interrupted(utcnow(), is_dead=self._not_running_here)

    def dispatch_ready(self) -> list[str]:
        """Claim as many ready studies as this process has free analysis slots and start analysing them."""
        dicom = self.settings.dicom
        self._keep_claims()
        with self._lock:
            busy = sum(1 for future in self._running.values() if not future.done())
        free = self.settings.analysis.concurrency - busy
        claimed = self.worklist.claim_ready(
            self.worker_id,
            utcnow(),
            dicom.stable_age_s,
            free,
            self.settings.analysis.lease_s,
            max_wait_s=dicom.max_study_wait_s,
        )
        started = []
        with self._lock:
            for study_uid, generation in claimed:
                future = self._pool.submit(self._analyse, study_uid, generation)
                future.add_done_callback(functools.partial(self._finished, study_uid))
                self._running[study_uid] = future
                started.append(study_uid)
        return started

    def _finished(self, study_uid: str, future: Future[AnalysisOutcome]) -> None:
        with self._lock:
            if self._running.get(study_uid) is future:
                del self._running[study_uid]
        if not future.cancelled() and future.exception() is not None:
            # Only the database can fail here (AI failures are recorded as such); the study stays listed and
            # `recover_interrupted` re-queues it (its run is no longer in flight here).
            log.error("study %s: the analysis could not be recorded: %r", study_uid, future.exception())

    def _analyse(self, study_uid: str, generation: int | None = None) -> AnalysisOutcome:
        assert self.runner is not None
        outcome = analyse_study(
            study_uid,
            self.worklist,
            self.registry,
            self.rules,
            self.runner,
            self.files,
            unavailable_models=set(self.model_errors),
            retry=RetryPolicy(self.settings.inference.max_attempts, self.settings.inference.retry_backoff_s),
            generation=generation,
            states=self.model_states,
        )
        with self._lock:
            self.outcomes.append(outcome)
            del self.outcomes[:-200]
        self.service_metrics.observe_stages(outcome.results)
        # What the analysis wrote to the outbox (results for the PACS, HL7 for the RIS, alerts) goes out now;
        # what cannot be delivered now is retried by the outbox thread.
        try:
            self.outbox.deliver_due(utcnow(), study_uid=study_uid)
        except Exception:  # noqa: BLE001 - delivery never touches the analysis or the worklist
            log.exception("study %s: outbox delivery failed", study_uid)
        self.keep_results(study_uid)
        return outcome

    def keep_results(self, study_uid: str) -> bool:
        """Build and keep the study's AI results (TID 1500 SR, SEG, preview) in the store, so that triage's
        DICOMweb lists them beside the images from the start, whether or not a PACS is configured (a delivery to
        a PACS sends these very instances). After the worklist is updated; a failure here changes nothing there.

        Returns:
            Whether results of active models are kept for the study now.
        """
        try:
            findings = reportable(self.worklist.get_study(study_uid, utcnow()).findings)
            if not findings:
                return False
            return bool(study_results(self.files, study_uid, findings, self.finding_codes()))
        except Exception as exc:  # noqa: BLE001 - results for viewers never touch the analysis or the worklist
            # No exception text: it may quote the study's headers.
            log.warning("study %s: AI results not kept for DICOMweb (%s); built when first asked for", study_uid,
                        type(exc).__name__)  # fmt: skip
            return False

    def finding_codes(self) -> dict[str, tuple[str, str, str]]:
        """The coded finding type per label, from the installed models' cards (written into the SR and SEG)."""
        return {
            spec.label: (spec.code.value, spec.code.scheme, spec.code.meaning)
            for model in self.registry.all()
            for spec in model.card.findings
            if spec.code is not None
        }

    def health(self) -> dict[str, Any]:
        unavailable = self.unavailable
        analysing = ServiceRole.ANALYSIS in self.roles
        return {
            # An analysis process is not ready while any installed model cannot run: its studies would only
            # collect failures. The other roles do not run models.
            "ready": self.ready and not (analysing and unavailable),
            "roles": sorted(self.roles),
            "worker": self.worker_id,
            "dicom_port": self.scp.port if self.scp is not None else None,
            # The runner only exists in an analysis process; the others run no models.
            "runner": self.runner_kind if analysing else None,
            # The Ray node this process's driver is attached to (the analysis node), when it runs on Ray.
            "ray_node_id": getattr(self.runner, "node_id", None) if analysing else None,
            "models": {m.card.name: m.card.version for m in self.registry.all()},
            "model_errors": unavailable,
        }

    def requeue(self, study_uid: str, user: str | None = None) -> None:
        """Queue one study for a fresh analysis now (an admin's action; the caller audits it).

        Raises:
            NotFoundError: no such study. ConflictError: it is being analysed now.
        """
        self.worklist.requeue(study_uid, utcnow(), user=user)
