"""Clinical fail-safe: whatever the AI does, a received study stays on the worklist at its clinical priority."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.dicom_factory import make_ct_series, make_radiograph
from triage.analysis import analyse_study
from triage.config import Settings
from triage.domain import AIStatus
from triage.serve.service import TriageService


@pytest.fixture
def service(tmp_path: Path) -> TriageService:
    settings = Settings()
    settings.data_dir = tmp_path / "data"
    svc = TriageService(settings, runner_kind="inprocess", start_scp=False)
    svc.start()
    yield svc
    svc.stop()


def _receive(service: TriageService, datasets: list) -> str:
    for ds in datasets:
        service.accept(ds, "TEST-AE")
    return str(datasets[0].StudyInstanceUID)


def _item(service: TriageService, study_uid: str) -> dict:
    items = [i.to_dict() for i in service.worklist.list_worklist(datetime.now(UTC), include_reported=True)]
    matches = [i for i in items if i["study_uid"] == study_uid]
    assert len(matches) == 1
    return matches[0]


def test_unreadable_ct_geometry_fails_the_ai_but_keeps_the_study_at_stat(service: TriageService) -> None:
    datasets = make_ct_series(12, requested_priority="STAT")
    datasets[4].Rows, datasets[4].Columns = 32, 128  # inconsistent matrix: the stack cannot be built

    study_uid = _receive(service, datasets)
    outcome = service._analyse(study_uid)
    assert outcome.ai_status == AIStatus.FAILED
    item = _item(service, study_uid)
    assert item["ai_status"] == "failed"
    assert "ct-head-ich" in item["ai_reason"]
    assert item["priority"]["level"] == "stat"
    assert item["findings"] == []


def test_runner_crash_is_recorded_as_failed_not_raised(service: TriageService) -> None:
    class CrashingRunner:
        def analyse(self, study_uid: str, work: object) -> list:
            raise RuntimeError("worker died")

    study_uid = _receive(service, make_ct_series(12, requested_priority="HIGH"))
    outcome = analyse_study(
        study_uid,
        service.worklist,
        service.registry,
        service.rules,
        CrashingRunner(),  # type: ignore[arg-type]
        service.files,
    )
    assert outcome.ai_status == AIStatus.FAILED
    item = _item(service, study_uid)
    assert item["ai_status"] == "failed" and "worker died" in item["ai_reason"]
    assert item["priority"]["level"] == "urgent"


def test_modality_no_model_handles_is_listed_not_applicable_with_the_reason(service: TriageService) -> None:
    ds = make_radiograph("DX", body_part="ABDOMEN")
    ds.StudyDescription = "ABDOMEN AP"
    study_uid = _receive(service, [ds])
    service._analyse(study_uid)
    item = _item(service, study_uid)
    assert item["ai_status"] == "not-applicable"
    assert "no-rule-matched" in item["ai_reason"]
    assert item["priority"]["level"] == "routine"


def test_model_with_tampered_weights_is_refused_and_its_studies_are_not_analysed(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    shutil.copytree(Settings().weights_dir / "xr-chest-pneumothorax", weights / "xr-chest-pneumothorax")
    card_path = next(weights.glob("xr-chest-pneumothorax/*/card.json"))
    card = json.loads(card_path.read_text())
    onnx = card_path.parent / card["weights"][0]["file"]
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\1")
    settings = Settings()
    settings.data_dir = tmp_path / "data"
    settings.weights_dir = weights
    svc = TriageService(settings, runner_kind="inprocess", start_scp=False)
    svc.start()
    try:
        assert "sha256" in svc.model_errors["xr-chest-pneumothorax"]
        study_uid = _receive(svc, [make_radiograph("DX")])
        svc._analyse(study_uid)
        item = _item(svc, study_uid)
        assert item["ai_status"] == "not-applicable"
        routing = svc.worklist.get_study(study_uid, datetime.now(UTC)).to_dict()
        assert "model-unavailable" in json.dumps(routing)
    finally:
        svc.stop()


def test_files_stored_but_not_indexed_before_a_crash_are_listed_at_start_with_their_waiting_time(
    tmp_path: Path,
) -> None:
    import os
    import time

    from triage.dicom.store import DicomStore

    settings = Settings()
    settings.data_dir = tmp_path / "data"
    ds = make_radiograph("DX", requested_priority="HIGH")
    # The store wrote the file, then the process died before the index was updated.
    store = DicomStore(settings.store_dir, settings.ensure_phi_salt(), index=lambda meta: True)
    stored = store.write(ds)
    two_hours_ago = time.time() - 7200
    os.utime(store.root / stored.meta.key, (two_hours_ago, two_hours_ago))
    svc = TriageService(settings, runner_kind="inprocess", start_scp=False)
    svc.start()
    try:
        item = _item(svc, str(ds.StudyInstanceUID))
        assert item["clinical_priority"] == "urgent"
        assert 115 <= item["waiting_min"] <= 125  # from when the file arrived, not from the restart
    finally:
        svc.stop()


def test_results_go_back_to_pacs_after_the_worklist_is_updated_and_a_dead_pacs_changes_nothing(
    tmp_path: Path,
) -> None:
    import socket

    import pydicom

    from tests.dicom_peers import Receiver
    from triage.training.synth_xray import generate_dataset

    pacs = Receiver(tmp_path / "pacs", ae_title="PACS")
    pacs.scp.start()
    settings = Settings()
    settings.data_dir = tmp_path / "data"
    settings.results.host, settings.results.port, settings.results.ae_title = "127.0.0.1", pacs.scp.port, "PACS"
    svc = TriageService(settings, runner_kind="inprocess", start_scp=False)
    svc.start()
    # The synthetic X-ray model runs in shadow (nothing is sent) until a site activates it: these films carry no
    # institution, so it is activated for site "" on a report that stands in for a local validation.
    report = {
        "model": "xr-chest-pneumothorax", "version": "1.0.0", "site": "", "n": 200, "n_positive": 100,
        "roc_auc": 0.97, "sensitivity_ci95": [0.85, 0.95], "specificity_ci95": [0.9, 0.98],
    }  # fmt: skip
    svc.model_states.promote("xr-chest-pneumothorax", "", report, "tests", datetime.now(UTC))
    try:
        generate_dataset(tmp_path / "xr", n=1, positive_fraction=1.0, seed=3, fmt="dicom")
        ds = pydicom.dcmread(next((tmp_path / "xr").rglob("*.dcm")))
        study_uid = _receive(svc, [ds])
        svc._analyse(study_uid)
        assert _item(svc, study_uid)["ai_status"] == "done"
        received = list(pacs.metas.values())
        modalities = sorted(m.modality for m in received)
        # A TID 1500 measurement report (Comprehensive 3D SR) with the finding located on the radiograph, and a
        # secondary capture of the radiograph with the AI's region.
        assert sorted(m.sop_class_uid for m in received) == [
            "1.2.840.10008.5.1.4.1.1.7",
            "1.2.840.10008.5.1.4.1.1.88.34",
        ]
        assert modalities == ["OT", "SR"]
        assert all(m.study_uid == study_uid for m in received)

        # The PACS goes away: the next study is still analysed and listed; only a log line records it.
        pacs.scp.stop()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            settings.results.port = sock.getsockname()[1]
        generate_dataset(tmp_path / "xr2", n=1, positive_fraction=1.0, seed=4, fmt="dicom")
        second = _receive(svc, [pydicom.dcmread(next((tmp_path / "xr2").rglob("*.dcm")))])
        svc._analyse(second)
        assert _item(svc, second)["ai_status"] == "done"
    finally:
        svc.stop()
        pacs.scp.stop()


class ScriptedRunner:
    """Returns the scripted outcome of each attempt for every routed series: "ok", "transient" or "permanent"."""

    def __init__(self, script: list[str]) -> None:
        self.script = list(script)
        self.calls = 0

    def analyse(self, study_uid: str, work: list) -> list:
        from triage.domain import SeriesResult

        outcome = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        results = []
        for series, decision in work:
            if outcome == "ok":
                results.append(SeriesResult(series.series_uid, decision.model, "1.0.0", True, []))
            else:
                error = "the model worker ran out of memory" if outcome == "transient" else "unreadable series"
                results.append(
                    SeriesResult(
                        series.series_uid, decision.model, "1.0.0", False, [], error, transient=outcome == "transient"
                    )
                )
        return results


def _analyse_with(service: TriageService, study_uid: str, runner: ScriptedRunner, attempts: int = 3):  # type: ignore[no-untyped-def]
    from triage.analysis import RetryPolicy

    return analyse_study(
        study_uid,
        service.worklist,
        service.registry,
        service.rules,
        runner,  # type: ignore[arg-type]
        service.files,
        retry=RetryPolicy(max_attempts=attempts, backoff_s=0.0),
    )


def test_transient_failures_are_retried_and_the_study_ends_done(service: TriageService) -> None:
    study_uid = _receive(service, [make_radiograph("DX", requested_priority="STAT")])
    runner = ScriptedRunner(["transient", "transient", "ok"])
    first = _analyse_with(service, study_uid, runner)
    assert first.retrying and first.ai_status == AIStatus.PENDING
    item = _item(service, study_uid)
    assert item["ai_status"] == "pending" and item["priority"]["level"] == "stat"
    assert item["ai_reason"] == (
        "AI analysis failed (xr-chest-pneumothorax: the model worker ran out of memory); retrying (2 of 3)"
    )
    assert _analyse_with(service, study_uid, runner).retrying
    assert "retrying (3 of 3)" in _item(service, study_uid)["ai_reason"]
    assert _analyse_with(service, study_uid, runner).ai_status == AIStatus.DONE
    assert runner.calls == 3
    assert _item(service, study_uid)["ai_status"] == "done"


def test_transient_failure_on_the_last_attempt_fails_the_study_as_transient(service: TriageService) -> None:
    study_uid = _receive(service, [make_radiograph("DX")])
    runner = ScriptedRunner(["transient"])
    for _ in range(2):
        assert _analyse_with(service, study_uid, runner).retrying
    last = _analyse_with(service, study_uid, runner)
    assert last.ai_status == AIStatus.FAILED and not last.retrying
    detail = service.worklist.get_study(study_uid, datetime.now(UTC))
    assert detail.failure_kind == "transient"
    assert "after 3 attempts; re-queued when the model can run again" in detail.item.ai_reason
    assert detail.item.priority.level == "routine"
    # The model is healthy again: the study is queued once more, without an admin.
    assert service.worklist.requeue_transient_failures(datetime.now(UTC), 3) == [study_uid]


def test_permanent_failures_are_not_retried(service: TriageService) -> None:
    study_uid = _receive(service, [make_radiograph("DX")])
    runner = ScriptedRunner(["permanent", "ok"])
    outcome = _analyse_with(service, study_uid, runner)
    assert outcome.ai_status == AIStatus.FAILED and runner.calls == 1
    assert service.worklist.get_study(study_uid, datetime.now(UTC)).failure_kind == "permanent"
    assert service.worklist.requeue_transient_failures(datetime.now(UTC), 3) == []


def test_a_pixel_bomb_is_listed_not_analysed_with_the_reason_and_never_decoded(service: TriageService) -> None:
    import resource
    from io import BytesIO

    import pydicom

    from tests.fuzz.corpus import pixel_bomb

    chest = make_radiograph("DX", requested_priority="HIGH")
    ds = pydicom.dcmread(BytesIO(pixel_bomb(base=chest)))
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    study_uid = _receive(service, [ds])
    outcome = service._analyse(study_uid)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib
    assert grown_kib < 1024 * 1024  # decoding the declared 65535 x 65535 frame would take 8 GiB
    assert outcome.ai_status == AIStatus.FAILED
    item = _item(service, study_uid)
    assert item["priority"]["level"] == "urgent"  # listed at its clinical priority
    assert "65535 x 65535 pixels exceeds the limit" in item["ai_reason"]
    assert service.worklist.get_study(study_uid, datetime.now(UTC)).failure_kind == "permanent"
