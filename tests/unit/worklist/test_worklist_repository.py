"""The worklist repository against SQLite and PostgreSQL: ingestion, analysis generations, claims and ordering."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from triage.config import PrioritySettings
from triage.domain import AIStatus, InstanceMeta, RoutingDecision, StageTime
from triage.errors import ConflictError, NotFoundError
from triage.worklist.events import Broadcaster
from triage.worklist.repository import Worklist
from triage.worklist.tables import Study

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"
SETTINGS = PrioritySettings(
    finding_levels={"intracranial_haemorrhage": "stat", "fracture": "urgent"},
    turnaround_min={"stat": 60, "urgent": 240, "routine": 1440},
    promote_at_fraction=0.75,
)


def meta(study: str, series: str = "1", n: int = 1, **kw) -> InstanceMeta:
    fields = {
        "study_uid": f"1.2.826.0.1.{study}",
        "series_uid": f"1.2.826.0.1.{study}.{series}",
        "sop_instance_uid": f"1.2.826.0.1.{study}.{series}.{n}",
        "sop_class_uid": CT,
        "modality": "CT",
        "key": f"{study}/{series}/{n}.dcm",
        "accession_number": f"ACC{study}",
        "patient_hash": "3f2a9c",
        "study_description": "CT HEAD",
        "institution": "North",
        "calling_ae": "MODALITY1",
    }
    fields.update(kw)
    return InstanceMeta(**fields)


def uid(study: str) -> str:
    return f"1.2.826.0.1.{study}"


def ich(flagged: bool = True, probability: float = 0.91) -> dict:
    return {
        "label": "intracranial_haemorrhage",
        "probability": probability,
        "flagged": flagged,
        "model": "ct-head-ich",
        "model_version": "1.0.0",
        "synthetic": False,
        "details": {"volume_ml": 4.2},
    }


@pytest.fixture
def events() -> Broadcaster:
    return Broadcaster()


@pytest.fixture
def wl(engine, events) -> Worklist:
    return Worklist(engine, SETTINGS, events, sender_priority={"ER_CT": "stat"})


# ------------------------------------------------------------------------------------------- ingestion


def test_new_study_appears_pending_at_clinical_priority(wl):
    assert wl.record_instance(meta("1", requested_priority="STAT"), T0) is True
    [item] = wl.list_worklist(T0)
    assert item.study_uid == uid("1")
    assert item.ai_status == "pending"
    assert item.clinical_priority == "stat"
    assert item.priority.level == "stat"
    assert item.priority.reasons[0].text == "clinical priority: stat (from request)"
    assert (item.accession_number, item.site, item.sending_ae, item.instance_count) == ("ACC1", "North", "MODALITY1", 1)
    assert item.received_at == T0
    assert item.received_at.tzinfo is not None


def test_duplicate_instance_is_reported_and_changes_nothing(wl):
    assert wl.record_instance(meta("1"), T0) is True
    assert wl.record_instance(meta("1"), T0 + timedelta(seconds=5)) is False
    detail = wl.get_study(uid("1"), T0)
    assert detail.instance_count == 1
    assert detail.item.last_instance_at == T0
    assert detail.series[0].n_instances == 1


def test_clinical_priority_from_request_then_sender_then_default(wl):
    wl.record_instance(meta("1", requested_priority="HIGH"), T0)
    wl.record_instance(meta("2", calling_ae="ER_CT"), T0)
    wl.record_instance(meta("3"), T0)
    wl.record_instance(meta("4", requested_priority="whenever"), T0)
    items = {i.study_uid: i for i in wl.list_worklist(T0)}
    assert items[uid("1")].clinical_priority == "urgent"
    assert items[uid("2")].clinical_priority == "stat"
    assert items[uid("2")].priority.reasons[0].text == "clinical priority: stat (from sending AE ER_CT)"
    assert items[uid("3")].clinical_priority == "routine"
    # An unreadable request priority does not lose the instance; the reason says what was ignored.
    assert items[uid("4")].clinical_priority == "routine"
    assert "'whenever' not recognised" in items[uid("4")].priority.reasons[0].text


def test_later_instance_may_raise_clinical_priority_never_lower(wl):
    wl.record_instance(meta("1", n=1, requested_priority="ROUTINE"), T0)
    wl.record_instance(meta("1", n=2, requested_priority="STAT"), T0)
    wl.record_instance(meta("1", n=3, requested_priority="LOW"), T0)
    assert wl.list_worklist(T0)[0].clinical_priority == "stat"


def test_modalities_of_a_study_are_joined_and_filterable(wl):
    wl.record_instance(meta("1", series="1", modality="CT"), T0)
    wl.record_instance(meta("1", series="2", modality="SR", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.67"), T0)
    wl.record_instance(meta("2", modality="CR"), T0)
    items = {i.study_uid: i for i in wl.list_worklist(T0)}
    assert items[uid("1")].modality == "CT\\SR"
    assert [i.study_uid for i in wl.list_worklist(T0, modality="sr")] == [uid("1")]
    assert [i.study_uid for i in wl.list_worklist(T0, modality="CR")] == [uid("2")]
    assert wl.list_worklist(T0, modality="C") == []


def test_series_of_lists_files_and_attributes(wl):
    for n in (1, 2, 3):
        wl.record_instance(meta("1", series="1", n=n, series_description="AXIAL 5mm", body_part="HEAD"), T0)
    wl.record_instance(meta("1", series="2", n=1, modality="SR"), T0)
    series = {s.series_uid: s for s in wl.series_of(uid("1"))}
    axial = series[uid("1") + ".1"]
    assert axial.n_instances == 3
    assert axial.files == ("1/1/1.dcm", "1/1/2.dcm", "1/1/3.dcm")  # store keys, in arrival order
    assert axial.sop_class_uid == CT
    assert axial.attributes["SeriesDescription"] == "AXIAL 5mm"
    assert axial.attributes["BodyPartExamined"] == "HEAD"
    assert series[uid("1") + ".2"].modality == "SR"
    with pytest.raises(NotFoundError, match="'nope'"):
        wl.series_of("nope")


@pytest.mark.parametrize(
    ("bad", "message"),
    [(datetime(2026, 3, 1), "timezone-aware"), (None, "timezone-aware")],
)
def test_naive_or_missing_time_is_refused(wl, bad, message):
    with pytest.raises(ValueError, match=message):
        wl.record_instance(meta("1"), bad)


def test_concurrent_record_instance_from_threads(wl, engine):
    """Several SCP handler threads index instances of the same studies at once, with resends among them."""
    studies, per_study = 3, 24
    metas = [meta(str(s), series=str(n % 2), n=n) for s in range(studies) for n in range(per_study)]
    # Every instance is sent by two threads: exactly one of the two must count it.
    work = metas + metas[::-1]
    results: list[bool] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    n_threads = 6
    barrier = threading.Barrier(n_threads)

    def worker(chunk):
        barrier.wait()
        for m in chunk:
            try:
                ok = wl.record_instance(m, T0)
            except BaseException as exc:  # collected and re-raised in the main thread
                errors.append(exc)
                continue
            with lock:
                results.append(ok)

    threads = [threading.Thread(target=worker, args=(work[i::n_threads],)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    assert results.count(True) == len(metas)
    assert results.count(False) == len(metas)
    items = wl.list_worklist(T0)
    assert len(items) == studies
    assert all(i.instance_count == per_study for i in items)
    for item in items:
        assert sum(s.n_instances for s in wl.series_of(item.study_uid)) == per_study
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Study)) == studies


# -------------------------------------------------------------------------------------------- analysis


def test_study_is_ready_once_stable_and_not_while_analysed(wl):
    wl.record_instance(meta("1", n=1), T0)
    wl.record_instance(meta("1", n=2), T0 + timedelta(seconds=4))
    assert wl.studies_ready(10, T0 + timedelta(seconds=12)) == []
    assert wl.studies_ready(10, T0 + timedelta(seconds=14)) == [uid("1")]
    generation = wl.begin_analysis(uid("1"), T0 + timedelta(seconds=15))
    assert generation == 1
    assert wl.list_worklist(T0)[0].ai_status == "analysing"
    assert wl.studies_ready(10, T0 + timedelta(seconds=60)) == []
    with pytest.raises(ConflictError, match="already being analysed"):
        wl.begin_analysis(uid("1"), T0 + timedelta(seconds=16))
    assert wl.finish_analysis(uid("1"), generation, [ich()], [], AIStatus.DONE, "", T0 + timedelta(seconds=40))
    assert wl.studies_ready(10, T0 + timedelta(seconds=60)) == []
    [item] = wl.list_worklist(T0 + timedelta(minutes=1))
    assert item.ai_status == "done"
    assert item.priority.level == "stat"
    assert item.findings[0].details == {"volume_ml": 4.2}
    with pytest.raises(ConflictError, match="already stored"):
        wl.finish_analysis(uid("1"), generation, [], [], AIStatus.DONE, "", T0 + timedelta(seconds=41))


def test_a_study_that_keeps_growing_is_analysed_after_max_wait_and_again_when_stable(wl):
    for second in range(0, 700, 5):  # an instance every 5 s for over 11 minutes: never stable for 10 s
        wl.record_instance(meta("g", n=second), T0 + timedelta(seconds=second))
        now = T0 + timedelta(seconds=second + 1)
        ready = wl.studies_ready(10, now, max_wait_s=600)
        if ready:
            break
    assert ready == [uid("g")]
    assert 600 <= second < 610
    generation = wl.begin_analysis(uid("g"), now)
    wl.record_instance(meta("g", n=9999), now + timedelta(seconds=2))
    assert wl.finish_analysis(uid("g"), generation, [], [], AIStatus.DONE, "", now + timedelta(seconds=3)) is False
    # Once it stops growing, the newer generation is analysed; the study is still one item.
    assert wl.studies_ready(10, now + timedelta(seconds=20), max_wait_s=600) == [uid("g")]
    assert len(wl.list_worklist(now)) == 1


def test_failed_reanalysis_keeps_the_earlier_flag_and_priority(wl):
    wl.record_instance(meta("f", n=1), T0)
    first = wl.begin_analysis(uid("f"), T0 + timedelta(seconds=20))
    assert wl.finish_analysis(uid("f"), first, [ich()], [], AIStatus.DONE, "", T0 + timedelta(seconds=30))
    wl.record_instance(meta("f", n=2), T0 + timedelta(seconds=40))
    second = wl.begin_analysis(uid("f"), T0 + timedelta(seconds=60))
    assert wl.finish_analysis(uid("f"), second, [], [], AIStatus.FAILED, "worker died", T0 + timedelta(seconds=70))
    [item] = wl.list_worklist(T0 + timedelta(seconds=71))
    assert item.ai_status == "failed" and "worker died" in item.ai_reason
    assert item.priority.level == "stat"  # an AI failure never lowers a priority
    assert item.findings[0].flagged is True


def test_ready_studies_are_oldest_first(wl):
    wl.record_instance(meta("b"), T0 + timedelta(seconds=1))
    wl.record_instance(meta("a"), T0 + timedelta(seconds=2))
    wl.record_instance(meta("c"), T0)
    assert wl.studies_ready(5, T0 + timedelta(minutes=1)) == [uid("c"), uid("b"), uid("a")]


def test_stat_studies_are_analysed_before_older_routine_ones(wl):
    wl.record_instance(meta("r"), T0)
    wl.record_instance(meta("u", requested_priority="HIGH"), T0 + timedelta(seconds=1))
    wl.record_instance(meta("s", requested_priority="STAT"), T0 + timedelta(seconds=2))
    assert wl.studies_ready(5, T0 + timedelta(minutes=1)) == [uid("s"), uid("u"), uid("r")]


def test_instance_during_analysis_supersedes_it(wl):
    wl.record_instance(meta("1", n=1), T0)
    first = wl.begin_analysis(uid("1"), T0 + timedelta(seconds=20))
    wl.record_instance(meta("1", n=2), T0 + timedelta(seconds=25))
    # Queued again at a newer generation while the first analysis still runs.
    assert wl.studies_ready(10, T0 + timedelta(seconds=40)) == [uid("1")]
    assert wl.finish_analysis(uid("1"), first, [ich()], [], AIStatus.DONE, "", T0 + timedelta(seconds=41)) is False
    [item] = wl.list_worklist(T0 + timedelta(seconds=42))
    assert item.ai_status == "pending"
    # The stale results are kept provisionally (a growing study must still show a bleed) until superseded.
    assert item.findings[0].flagged is True and item.priority.level == "stat"
    assert "re-analysis queued" in item.ai_reason
    second = wl.begin_analysis(uid("1"), T0 + timedelta(seconds=45))
    assert second == first + 1
    assert wl.series_of(uid("1"))[0].n_instances == 2
    assert wl.finish_analysis(uid("1"), second, [ich(False, 0.1)], [], AIStatus.DONE, "", T0 + timedelta(seconds=60))
    items = wl.list_worklist(T0 + timedelta(minutes=2))
    assert len(items) == 1  # one row per study, whatever the number of analyses
    assert items[0].ai_status == "done"
    assert items[0].findings[0].flagged is False


def test_older_analysis_finishing_after_the_newer_one_is_discarded(wl):
    wl.record_instance(meta("1", n=1), T0)
    first = wl.begin_analysis(uid("1"), T0 + timedelta(seconds=20))
    wl.record_instance(meta("1", n=2), T0 + timedelta(seconds=25))
    second = wl.begin_analysis(uid("1"), T0 + timedelta(seconds=40))
    assert wl.finish_analysis(uid("1"), second, [ich()], [], AIStatus.DONE, "", T0 + timedelta(seconds=50))
    assert not wl.finish_analysis(uid("1"), first, [], [], AIStatus.FAILED, "timeout", T0 + timedelta(seconds=55))
    [item] = wl.list_worklist(T0 + timedelta(minutes=1))
    assert (item.ai_status, item.priority.level, len(item.findings)) == ("done", "stat", 1)


def test_instance_after_analysis_requeues_and_keeps_earlier_findings(wl):
    wl.record_instance(meta("1", n=1), T0)
    gen = wl.begin_analysis(uid("1"), T0 + timedelta(seconds=20))
    wl.finish_analysis(uid("1"), gen, [ich()], [], AIStatus.DONE, "", T0 + timedelta(seconds=30))
    wl.record_instance(meta("1", series="2", n=1), T0 + timedelta(minutes=5))
    assert wl.studies_ready(10, T0 + timedelta(minutes=6)) == [uid("1")]
    [item] = wl.list_worklist(T0 + timedelta(minutes=6))
    assert item.ai_status == "pending"
    # Until the newer analysis supersedes them, the earlier findings still hold the study up.
    assert item.priority.level == "stat"
    assert wl.begin_analysis(uid("1"), T0 + timedelta(minutes=6)) == gen + 1


def test_ai_failure_keeps_the_study_listed_at_clinical_priority(wl):
    wl.record_instance(meta("1", requested_priority="STAT"), T0)
    wl.record_instance(meta("2"), T0)
    for study in ("1", "2"):
        gen = wl.begin_analysis(uid(study), T0 + timedelta(seconds=20))
        wl.finish_analysis(uid(study), gen, [], [], AIStatus.FAILED, "model ct-head-ich not installed", T0)
    items = {i.study_uid: i for i in wl.list_worklist(T0 + timedelta(minutes=1))}
    assert set(items) == {uid("1"), uid("2")}
    assert items[uid("1")].priority.level == "stat"  # an AI failure never lowers priority
    assert items[uid("2")].priority.level == "routine"
    failed = items[uid("1")].priority.reasons[1]
    assert (failed.code, failed.text) == (
        "ai-failed",
        "AI analysis failed: model ct-head-ich not installed; clinical priority kept",
    )
    assert items[uid("1")].ai_reason == "model ct-head-ich not installed"
    assert [i.study_uid for i in wl.list_worklist(T0, status="failed")] == [uid("1"), uid("2")]
    # A failure is final for that generation: it is not retried in a loop.
    assert wl.studies_ready(10, T0 + timedelta(minutes=5)) == []


def test_recover_interrupted_requeues_studies_left_analysing(wl):
    wl.record_instance(meta("1"), T0)
    wl.record_instance(meta("2"), T0)
    wl.begin_analysis(uid("1"), T0 + timedelta(seconds=20))
    assert wl.recover_interrupted(T0 + timedelta(minutes=1)) == [uid("1")]
    assert wl.list_worklist(T0, status="analysing") == []
    assert wl.studies_ready(10, T0 + timedelta(minutes=1)) == [uid("1"), uid("2")]
    assert wl.begin_analysis(uid("1"), T0 + timedelta(minutes=2)) == 1


def test_finish_analysis_refuses_bad_input(wl):
    wl.record_instance(meta("1"), T0)
    gen = wl.begin_analysis(uid("1"), T0)
    with pytest.raises(ValueError, match="finished status"):
        wl.finish_analysis(uid("1"), gen, [], [], AIStatus.ANALYSING, "", T0)
    with pytest.raises(ValueError, match="unknown AI status 'great'"):
        wl.finish_analysis(uid("1"), gen, [], [], "great", "", T0)
    with pytest.raises(ValueError, match="generation 7 .* never issued"):
        wl.finish_analysis(uid("1"), 7, [], [], AIStatus.DONE, "", T0)
    with pytest.raises(ValueError, match="lacks"):
        wl.finish_analysis(uid("1"), gen, [{"label": "x"}], [], AIStatus.DONE, "", T0)
    with pytest.raises(NotFoundError):
        wl.finish_analysis("1.9.9", 1, [], [], AIStatus.DONE, "", T0)
    with pytest.raises(NotFoundError):
        wl.begin_analysis("1.9.9", T0)


def test_get_study_has_series_with_routing_and_history(wl):
    wl.record_instance(meta("1", series="1"), T0)
    wl.record_instance(meta("1", series="2", modality="SR"), T0)
    gen = wl.begin_analysis(uid("1"), T0 + timedelta(seconds=20))
    routing = [
        RoutingDecision(series_uid=uid("1") + ".1", model="ct-head-ich", rule="ct-head", reason="matched rule ct-head"),
        {"series_uid": uid("1") + ".2", "model": None, "rule": None, "reason": "non-image"},
    ]
    wl.finish_analysis(uid("1"), gen, [ich()], routing, AIStatus.DONE, "", T0 + timedelta(seconds=30))
    detail = wl.get_study(uid("1"), T0 + timedelta(minutes=1))
    by_uid = {s.series_uid: s for s in detail.series}
    assert by_uid[uid("1") + ".1"].routing.model == "ct-head-ich"
    assert by_uid[uid("1") + ".2"].routing.reason == "non-image"
    assert detail.instance_count == 2
    assert [h.kind for h in detail.history] == ["received", "analysis-started", "analysis-finished"]
    data = detail.to_dict()
    assert data["priority"]["level"] == "stat"
    assert data["series"][0]["routing"] is not None
    with pytest.raises(NotFoundError, match="'1.9.9'"):
        wl.get_study("1.9.9", T0)


# --------------------------------------------------------------------------------------- list & order


def test_worklist_order_minutes_waited_plus_head_start_then_oldest(wl):
    # The policy's order (triage.worklist.priority): minutes waited plus the level's head start (stat 120 min,
    # urgent and routine none), the stat head start for any study waiting 120 min or more; then the oldest.
    now = T0 + timedelta(hours=3)
    wl.record_instance(meta("routine-old"), now - timedelta(minutes=170))
    wl.record_instance(meta("urgent-fresh", requested_priority="HIGH"), now - timedelta(minutes=10))
    wl.record_instance(meta("urgent-near", requested_priority="HIGH"), now - timedelta(minutes=170))
    wl.record_instance(meta("stat", requested_priority="STAT"), now - timedelta(minutes=2))
    wl.record_instance(meta("routine-tie-2"), now - timedelta(minutes=30))
    wl.record_instance(meta("routine-ich"), now - timedelta(minutes=1))
    gen = wl.begin_analysis(uid("routine-ich"), now)
    wl.finish_analysis(uid("routine-ich"), gen, [ich()], [], AIStatus.DONE, "", now)
    items = wl.list_worklist(now)
    assert [(i.study_uid, i.priority.score) for i in items] == [
        (uid("routine-old"), 290.0),  # waiting 170 min: past the long wait, ordered with stat studies
        (uid("urgent-near"), 290.0),  # the same wait and arrival: the Study Instance UID decides
        (uid("stat"), 122.0),  # stat, 2 min
        (uid("routine-ich"), 121.0),  # raised to stat by AI, 1 min
        (uid("routine-tie-2"), 30.0),  # urgent and routine in arrival order
        (uid("urgent-fresh"), 10.0),
    ]
    assert [i.priority.level for i in items] == ["routine", "urgent", "stat", "stat", "routine", "urgent"]
    assert items[1].turnaround_left_min == pytest.approx(70)
    assert items[1].waiting_min == pytest.approx(170)


def test_waiting_promotes_a_routine_study_at_read_time(wl):
    wl.record_instance(meta("1"), T0)
    assert wl.list_worklist(T0 + timedelta(minutes=1079))[0].priority.level == "routine"
    late = wl.list_worklist(T0 + timedelta(minutes=1080))[0]
    assert late.priority.level == "urgent"
    assert late.priority.reasons[-1].code == "waiting-promoted"
    assert late.turnaround_left_min == pytest.approx(360)  # against the routine target it was given


def test_filters(wl):
    wl.record_instance(meta("1", institution="North", requested_priority="STAT"), T0)
    wl.record_instance(meta("2", institution="South"), T0)
    assert [i.study_uid for i in wl.list_worklist(T0, site="South")] == [uid("2")]
    assert [i.study_uid for i in wl.list_worklist(T0, level="stat")] == [uid("1")]
    assert [i.study_uid for i in wl.list_worklist(T0, accession="ACC2")] == [uid("2")]
    assert [i.study_uid for i in wl.list_worklist(T0, status="pending")] == [uid("1"), uid("2")]
    assert wl.list_worklist(T0, status="done") == []
    with pytest.raises(ValueError, match="unknown AI status 'finished'"):
        wl.list_worklist(T0, status="finished")
    with pytest.raises(ValueError, match="unknown priority level 'asap-ish'"):
        wl.list_worklist(T0, level="asap-ish")


def test_to_dict_is_json_ready(wl):
    import json

    wl.record_instance(meta("1"), T0)
    data = wl.list_worklist(T0 + timedelta(minutes=3))[0].to_dict()
    json.dumps(data)
    assert data["received_at"] == "2026-03-01T08:00:00+00:00"
    assert data["waiting_min"] == 3.0
    assert data["priority"]["reasons"][0] == {
        "code": "clinical",
        "text": "clinical priority: routine (default)",
        "level": "routine",
    }
    assert "patient_hash" not in data


# ------------------------------------------------------------------------------------------- claims


def test_claim_conflicts_release_and_report(wl):
    wl.record_instance(meta("1"), T0)
    study = uid("1")
    wl.claim(study, "dr_a", T0)
    wl.claim(study, "dr_a", T0)  # claiming one's own claim again is fine
    with pytest.raises(ConflictError, match="claimed by 'dr_a', not 'dr_b'"):
        wl.claim(study, "dr_b", T0)
    with pytest.raises(ConflictError, match="'dr_b' cannot release"):
        wl.release(study, "dr_b")
    with pytest.raises(ConflictError, match="claimed by 'dr_a'"):
        wl.mark_reported(study, "dr_b", T0)
    assert wl.list_worklist(T0)[0].claimed_by == "dr_a"
    wl.release(study, "admin", is_admin=True)
    assert wl.list_worklist(T0)[0].claimed_by is None
    wl.claim(study, "dr_b", T0 + timedelta(minutes=1))
    wl.mark_reported(study, "dr_b", T0 + timedelta(minutes=20))
    assert wl.list_worklist(T0) == []
    [reported] = wl.list_worklist(T0, include_reported=True)
    assert (reported.reported, reported.reported_by, reported.claimed_by) == (True, "dr_b", None)
    with pytest.raises(ConflictError, match="already reported by 'dr_b'"):
        wl.claim(study, "dr_a", T0)
    with pytest.raises(ConflictError, match="already reported by 'dr_b'"):
        wl.mark_reported(study, "dr_a", T0)
    kinds = [h.kind for h in wl.get_study(study, T0).history]
    assert kinds == ["received", "claimed", "released", "claimed", "reported"]


def test_claims_on_unknown_studies_and_bad_users(wl):
    for call in (
        lambda: wl.claim("1.9.9", "dr_a", T0),
        lambda: wl.release("1.9.9", "dr_a"),
        lambda: wl.mark_reported("1.9.9", "dr_a", T0),
    ):
        with pytest.raises(NotFoundError, match="'1.9.9'"):
            call()
    wl.record_instance(meta("1"), T0)
    with pytest.raises(ValueError, match="non-empty"):
        wl.claim(uid("1"), "  ", T0)


def test_concurrent_claims_only_one_wins(wl):
    wl.record_instance(meta("1"), T0)
    winners, conflicts = [], []
    barrier = threading.Barrier(4)

    def grab(user):
        barrier.wait()
        try:
            wl.claim(uid("1"), user, T0)
            winners.append(user)
        except ConflictError:
            conflicts.append(user)

    threads = [threading.Thread(target=grab, args=(f"dr_{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(winners) == 1 and len(conflicts) == 3
    assert wl.list_worklist(T0)[0].claimed_by == winners[0]


# ------------------------------------------------------------------------------------------- events


def test_every_change_is_published(wl, events):
    seen: list[dict] = []
    with events.listening(seen.append):
        wl.record_instance(meta("1", n=1), T0)
        wl.record_instance(meta("1", n=2), T0)
        wl.record_instance(meta("1", n=2), T0)  # duplicate: no change, no event
        gen = wl.begin_analysis(uid("1"), T0)
        wl.finish_analysis(uid("1"), gen, [], [], AIStatus.DONE, "", T0)
        wl.claim(uid("1"), "dr_a", T0)
        wl.mark_reported(uid("1"), "dr_a", T0)
    assert [e["change"] for e in seen] == ["created", "instance", "analysis-started", "analysed", "claimed", "reported"]
    assert all(e == {"type": "study.updated", "study_uid": uid("1"), "change": e["change"]} for e in seen)


def test_worklist_opens_from_a_url_and_migrates(tmp_path):
    wl = Worklist.open(f"sqlite:///{tmp_path / 'open.db'}", SETTINGS)
    assert wl.record_instance(meta("1"), T0)
    wl.engine.dispose()


def test_invalid_sender_priority_is_refused(engine):
    with pytest.raises(ValueError, match="sender_priority\\['ER'\\].*'soonish'"):
        Worklist(engine, SETTINGS, sender_priority={"ER": "soonish"})


# ------------------------------------------------------------------------------------------- retries


def test_transient_failure_is_deferred_then_retried_after_its_backoff(wl):
    wl.record_instance(meta("r", requested_priority="STAT"), T0)
    gen = wl.begin_analysis(uid("r"), T0 + timedelta(seconds=20))
    retry_at = T0 + timedelta(seconds=50)
    reason = "AI analysis failed (ct-head-ich: the model worker ran out of memory); retrying (2 of 3)"
    assert wl.defer_analysis(uid("r"), gen, reason, retry_at, T0 + timedelta(seconds=30)) == 1
    [item] = wl.list_worklist(T0 + timedelta(seconds=31))
    assert item.ai_status == "pending" and item.ai_reason == reason
    assert item.priority.level == "stat"  # still listed at its clinical priority
    assert wl.studies_ready(10, T0 + timedelta(seconds=45)) == []  # not before its backoff
    assert wl.studies_ready(10, T0 + timedelta(seconds=50)) == [uid("r")]
    assert wl.analysis_attempts(uid("r")) == 1
    again = wl.begin_analysis(uid("r"), T0 + timedelta(seconds=51))
    assert again == gen  # the same generation, tried again
    assert wl.list_worklist(T0 + timedelta(seconds=52))[0].ai_reason == reason  # says it is a retry
    wl.finish_analysis(uid("r"), again, [ich()], [], AIStatus.DONE, "analysed", T0 + timedelta(seconds=60))
    detail = wl.get_study(uid("r"), T0 + timedelta(seconds=61))
    assert detail.analysis_attempts == 0 and detail.failure_kind == ""
    kinds = [e.kind for e in detail.history]
    assert kinds.count("analysis-retry") == 1 and kinds[-1] == "analysis-finished"


def test_deferred_retry_keeps_earlier_findings_and_priority(wl):
    wl.record_instance(meta("k", n=1), T0)
    first = wl.begin_analysis(uid("k"), T0 + timedelta(seconds=20))
    wl.finish_analysis(uid("k"), first, [ich()], [], AIStatus.DONE, "", T0 + timedelta(seconds=30))
    wl.requeue(uid("k"), T0 + timedelta(seconds=40), user="admin")
    second = wl.begin_analysis(uid("k"), T0 + timedelta(seconds=50))
    wl.defer_analysis(uid("k"), second, "retrying (2 of 3)", T0 + timedelta(seconds=70), T0 + timedelta(seconds=55))
    [item] = wl.list_worklist(T0 + timedelta(seconds=56))
    assert item.priority.level == "stat" and item.findings[0].flagged is True  # never demoted


def test_transient_failures_are_requeued_once_the_model_runs_and_only_a_bounded_number_of_times(wl):
    for study in ("t", "p"):
        wl.record_instance(meta(study), T0)
    routing = [{"series_uid": uid("t") + ".1", "modality": "CT", "model": "ct-head-ich", "rule": "r", "reason": ""}]
    gen = wl.begin_analysis(uid("t"), T0 + timedelta(seconds=20))
    wl.finish_analysis(
        uid("t"), gen, [], routing, AIStatus.FAILED, "worker died", T0 + timedelta(seconds=30), failure_kind="transient"
    )
    gen = wl.begin_analysis(uid("p"), T0 + timedelta(seconds=20))
    wl.finish_analysis(uid("p"), gen, [], [], AIStatus.FAILED, "unreadable series", T0 + timedelta(seconds=30))
    assert wl.get_study(uid("p"), T0).failure_kind == "permanent"
    assert wl.requeue_transient_failures(T0 + timedelta(minutes=1), 2, models=["xr-chest-pneumothorax"]) == []
    assert wl.requeue_transient_failures(T0 + timedelta(minutes=1), 2, models=["ct-head-ich"]) == [uid("t")]
    assert wl.studies_ready(10, T0 + timedelta(minutes=1)) == [uid("t")]  # the permanent failure stays failed
    for n in range(2):
        gen = wl.begin_analysis(uid("t"), T0 + timedelta(minutes=2 + n))
        wl.finish_analysis(
            uid("t"),
            gen,
            [],
            routing,
            AIStatus.FAILED,
            "worker died",
            T0 + timedelta(minutes=2 + n),
            failure_kind="transient",
        )
        wl.requeue_transient_failures(T0 + timedelta(minutes=3 + n), 2)
    # Re-queued twice automatically; after that it waits for an admin.
    assert wl.get_study(uid("t"), T0).item.ai_status == "failed"
    assert wl.requeue_transient_failures(T0 + timedelta(minutes=9), 2) == []
    wl.requeue(uid("t"), T0 + timedelta(minutes=10), user="admin")
    detail = wl.get_study(uid("t"), T0 + timedelta(minutes=10))
    assert detail.item.ai_status == "pending"
    assert detail.history[-1].kind == "requeued" and detail.history[-1].user == "admin"


def test_requeue_refuses_a_study_being_analysed_and_unknown_studies(wl):
    wl.record_instance(meta("a"), T0)
    wl.begin_analysis(uid("a"), T0 + timedelta(seconds=20))
    with pytest.raises(ConflictError, match="being analysed"):
        wl.requeue(uid("a"), T0 + timedelta(seconds=30), user="admin")
    with pytest.raises(NotFoundError):
        wl.requeue(uid("nope"), T0, user="admin")


# ------------------------------------------------------------------------------------------- claims and leases


def test_claims_take_each_ready_study_once_and_record_the_run(wl):
    for study in ("1", "2", "3"):
        wl.record_instance(meta(study), T0)
    now = T0 + timedelta(seconds=30)
    first = wl.claim_ready("host-a:1", now, 10, limit=2, lease_s=60)
    second = wl.claim_ready("host-b:2", now, 10, limit=2, lease_s=60)
    assert [uid for uid, _ in first] == [uid("1"), uid("2")]
    assert second == [(uid("3"), 1)]
    assert wl.claim_ready("host-c:3", now, 10, limit=5, lease_s=60) == []
    wl.finish_analysis(uid("3"), 1, [], [], AIStatus.DONE, "analysed", now, stages=[{"stage": "load", "seconds": 1}])
    [run] = wl.get_study(uid("3"), now).analyses
    assert (run.status, run.worker, run.attempt, run.generation) == ("done", "host-b:2", 1, 1)
    assert run.started_at and run.finished_at and run.stages == [StageTime(stage="load", seconds=1)]


def test_concurrent_claims_never_take_a_study_twice(wl, engine):
    for n in range(12):
        wl.record_instance(meta(f"c{n}"), T0)
    claimed: list[str] = []
    errors: list[BaseException] = []

    def claim(worker: str) -> None:
        try:
            other = Worklist(engine, SETTINGS)
            for _ in range(6):
                claimed.extend(uid for uid, _ in other.claim_ready(worker, T0 + timedelta(minutes=1), 10, 1, 60))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(f"host:{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert sorted(claimed) == sorted(uid(f"c{n}") for n in range(12))  # each study exactly once


def test_a_study_analysed_at_an_older_generation_is_not_claimed_again_until_that_run_ends(wl):
    wl.record_instance(meta("g", n=1), T0)
    [(study_uid, gen)] = wl.claim_ready("host:1", T0 + timedelta(seconds=20), 10, 5, 60)
    wl.record_instance(meta("g", n=2), T0 + timedelta(seconds=25))  # a late instance: generation 2 is due
    assert wl.claim_ready("host:2", T0 + timedelta(seconds=40), 10, 5, 60) == []
    wl.finish_analysis(study_uid, gen, [], [], AIStatus.DONE, "", T0 + timedelta(seconds=41))
    assert wl.claim_ready("host:2", T0 + timedelta(seconds=42), 10, 5, 60) == [(study_uid, 2)]
    statuses = [r.status for r in wl.get_study(study_uid, T0).analyses]
    assert statuses == ["superseded", "running"]


def test_a_claim_whose_lease_runs_out_is_taken_back_and_a_live_one_is_not(wl):
    wl.record_instance(meta("l"), T0)
    wl.record_instance(meta("m"), T0)
    claimed = dict(wl.claim_ready("host:1", T0 + timedelta(seconds=20), 10, 2, lease_s=60))
    # host:1 keeps renewing "m" but stops renewing "l" (as if the thread analysing it died).
    assert wl.renew_leases("host:1", [uid("m")], T0 + timedelta(seconds=70), 60) == 1
    assert wl.recover_interrupted(T0 + timedelta(seconds=75)) == []  # both leases still valid
    assert wl.recover_interrupted(T0 + timedelta(seconds=90)) == [uid("l")]
    assert wl.get_study(uid("m"), T0).item.ai_status == "analysing"
    runs = wl.get_study(uid("l"), T0).analyses
    assert [r.status for r in runs] == ["interrupted"]
    # The next claim is a fresh attempt at the same generation.
    assert wl.claim_ready("host:2", T0 + timedelta(seconds=91), 10, 5, 60) == [(uid("l"), claimed[uid("l")])]
    # A process known to be dead loses its claims at once, lease or not.
    assert wl.recover_interrupted(T0 + timedelta(seconds=92), is_dead=lambda worker, _: worker == "host:2") == [
        uid("l")
    ]


# ------------------------------------------------------------------------------------ stored JSON, read back
def _store_findings(wl, study_uid: str, findings: list) -> None:
    """Write a study's findings column as an earlier release left it (bypassing today's validation)."""
    from sqlalchemy import update

    from triage.worklist.tables import Study

    with wl.engine.begin() as conn:
        conn.execute(update(Study).where(Study.study_uid == study_uid).values(findings=findings, ai_status="done"))


def test_findings_stored_by_the_previous_release_load_as_records(wl):
    wl.record_instance(meta("old"), T0)
    # As 0.x wrote them: no overlay_file or series_uid, and a key this release does not know.
    _store_findings(wl, uid("old"), [{**ich(), "legacy_score": 3}])
    [item] = wl.list_worklist(T0 + timedelta(minutes=1))
    (finding,) = item.findings
    assert (finding.label, finding.flagged, finding.details) == ("intracranial_haemorrhage", True, {"volume_ml": 4.2})
    assert (finding.series_uid, finding.overlay_file, finding.overlay_sop_instance_uid) == ("", None, None)
    assert item.priority.level == "stat"
    assert "legacy_score" not in wl.get_study(uid("old"), T0).to_dict()["findings"][0]


def test_an_unreadable_stored_finding_lists_the_study_at_stat_with_the_reason(wl, caplog):
    wl.record_instance(meta("bad"), T0)
    _store_findings(wl, uid("bad"), [{"label": "intracranial_haemorrhage", "flagged": "perhaps"}])
    [item] = wl.list_worklist(T0)
    # Never demoted by an error: the highest level, saying why, and the study is still listed.
    assert item.priority.level == "stat" and item.priority.reasons[-1].code == "priority-error"
    assert item.findings == []
    assert uid("bad") in caplog.text
    # The score shown is the one it is ordered by: a stat study's head start plus the minutes it has waited.
    [later] = wl.list_worklist(T0 + timedelta(minutes=30))
    assert later.priority.score == 150.0
