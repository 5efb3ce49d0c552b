"""The running service: wires the store, the SCP, the worklist, the models and the runner, and watches for
complete studies (no instance for `stable_age_s`) to send them to the pipeline.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from pydicom import Dataset

from triage.config import Settings
from triage.dicom.results import export_study_results
from triage.dicom.scp import StorageSCP
from triage.dicom.store import DicomStore, StoredInstance, StorePolicy
from triage.domain import AIStatus, InstanceMeta, utcnow
from triage.errors import TriageError
from triage.models.registry import ModelRegistry
from triage.pipelines.routing import RoutingRules
from triage.pipelines.runner import Runner, make_runner
from triage.serve.analysis import AnalysisOutcome, analyse_study
from triage.worklist.db import create_engine_for, migrate
from triage.worklist.events import Broadcaster
from triage.worklist.repository import Worklist

log = logging.getLogger(__name__)


class TriageService:
    """Everything `triage serve` runs besides HTTP. Start once, stop once."""

    def __init__(self, settings: Settings, runner_kind: str = "ray", start_scp: bool = True) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        settings.store_dir.mkdir(parents=True, exist_ok=True)
        settings.overlay_dir.mkdir(parents=True, exist_ok=True)
        url = settings.resolved_database_url
        migrate(url)
        self.events = Broadcaster()
        self.worklist = Worklist(
            create_engine_for(url),
            settings.priority,
            events=self.events,
            sender_priority=settings.dicom.sender_priority,
        )
        self.store = DicomStore(
            settings.store_dir,
            settings.ensure_phi_salt(),
            index=self._index,
            policy=StorePolicy.from_settings(settings.dicom),
        )
        self.registry = ModelRegistry(settings.weights_dir)
        self.rules = RoutingRules.load(settings.routing_rules)
        self.runner_kind = runner_kind
        self.runner: Runner | None = None
        self.scp = StorageSCP(settings.dicom, self.accept) if start_scp else None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="analysis")
        self._running: dict[str, Future[AnalysisOutcome]] = {}
        self._lock = threading.Lock()
        self.outcomes: list[AnalysisOutcome] = []
        self.model_errors: dict[str, str] = {}
        self.ready = False
        self._reindexing = False

    # ------------------------------------------------------------------ ingest
    def _index(self, meta: InstanceMeta) -> bool:
        received_at = utcnow()
        if self._reindexing:
            # Files found on disk at start-up arrived before the restart: their waiting time counts from then.
            received_at = datetime.fromtimestamp(os.stat(meta.path).st_mtime, UTC)
        return self.worklist.record_instance(meta, received_at)

    def accept(self, ds: Dataset, calling_ae: str = "") -> StoredInstance:
        """Store and index one instance; returns only once it is durable (the sender may then hear success)."""
        return self.store.write(ds, calling_ae)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        for problem in self.registry.problems:
            log.error("model registry: %s", problem)
        for model in self.registry.all():
            try:
                model.verify()
            except Exception as exc:  # noqa: BLE001 - refuse that model, keep serving the others
                self.model_errors[model.card.name] = str(exc)
                log.error("%s", exc)
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
        self.worklist.recover_interrupted(utcnow())
        if self.scp is not None:
            self.scp.start()
            log.info("DICOM SCP %s listening on port %s", self.settings.dicom.ae_title, self.scp.port)
        self.runner = make_runner(self.runner_kind, self.registry, self.settings.inference, self.settings.ray)
        self.runner.warm_up()
        self.model_errors.update(getattr(self.runner, "load_errors", {}))
        self._watcher = threading.Thread(target=self._watch, name="study-watcher", daemon=True)
        self._watcher.start()
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        self._stop.set()
        if self.scp is not None:
            self.scp.stop()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.runner is not None:
            self.runner.close()

    # ------------------------------------------------------------------ study completion
    def _watch(self) -> None:
        """Poll for studies that have been stable for `stable_age_s` and analyse them (at most one run per study)."""
        period_s = max(0.2, min(1.0, self.settings.dicom.stable_age_s / 4))
        while not self._stop.wait(period_s):
            try:
                self.dispatch_ready()
            except Exception:  # noqa: BLE001 - the watcher must outlive any single failure
                log.exception("study watcher iteration failed")

    def dispatch_ready(self) -> list[str]:
        dicom = self.settings.dicom
        ready = self.worklist.studies_ready(dicom.stable_age_s, utcnow(), max_wait_s=dicom.max_study_wait_s)
        started = []
        with self._lock:
            for study_uid in ready:
                running = self._running.get(study_uid)
                if running is not None and not running.done():
                    continue  # new instances arrived mid-analysis: re-analysed after this run finishes
                future = self._pool.submit(self._analyse, study_uid)
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
            # is re-queued by `recover_interrupted` on the next start.
            log.error("study %s: the analysis could not be recorded: %r", study_uid, future.exception())

    def _analyse(self, study_uid: str) -> AnalysisOutcome:
        assert self.runner is not None
        outcome = analyse_study(
            study_uid,
            self.worklist,
            self.registry,
            self.rules,
            self.runner,
            self.settings.overlay_dir,
            unavailable_models=set(self.model_errors),
        )
        with self._lock:
            self.outcomes.append(outcome)
            del self.outcomes[:-200]
        self._send_results(outcome)
        return outcome

    def _send_results(self, outcome: AnalysisOutcome) -> None:
        """Send the analysis back to PACS when one is configured. After the worklist is updated, and a PACS that
        is down only costs a log line: it never touches the study's place on the worklist."""
        results = self.settings.results
        if not results.host or outcome.ai_status != AIStatus.DONE or not outcome.findings:
            return
        try:
            sent = export_study_results(
                self.settings.store_dir,
                self.settings.overlay_dir,
                outcome.study_uid,
                outcome.findings,
                str(outcome.ai_status),
                outcome.reason,
                (results.ae_title, results.host, results.port),
                calling_ae=results.calling_ae,
            )
            log.info("study %s: %d result instance(s) sent to %s", outcome.study_uid, sent, results.ae_title)
        except TriageError as exc:
            log.warning("study %s: AI results not sent to %s: %s", outcome.study_uid, results.ae_title, exc)

    def health(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "dicom_port": self.scp.port if self.scp is not None else None,
            "runner": self.runner_kind,
            "models": {m.card.name: m.card.version for m in self.registry.all()},
            "model_errors": self.model_errors,
        }
