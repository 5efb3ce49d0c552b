"""Client hospitals as records: recognition, per-site rules in the priority, credentialed reading, next study,
idle claims (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
from datetime import date, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from tests.unit.worklist.test_worklist_repository import SETTINGS, T0, ich, meta, uid
from triage.domain import AIStatus, PriorityLevel
from triage.errors import ConflictError, NotFoundError, NotPermittedError
from triage.worklist.accounts import AuditRow
from triage.worklist.repository import ReadScope, Worklist
from triage.worklist.sites import STOW_PREFIX, InvalidSiteError, parse_site

CITY = parse_site(
    {
        "name": "CITY HOSPITAL",
        "ae_titles": ["CITY_CT"],
        "institution_names": ["City General Hospital"],
        "stow_accounts": ["city-bridge"],
        "time_zone": "Europe/London",
        "turnaround_min": {"stat": 20},
        "finding_levels": {"intracranial_haemorrhage": "urgent"},
        "claim_idle_min": 10,
    }
)
HILL = parse_site({"name": "HILL CLINIC", "ae_titles": ["HILL_DX"], "time_zone": "Asia/Kolkata"})


@pytest.fixture
def wl(db_url):
    worklist = Worklist.open(db_url, SETTINGS)
    worklist.sites.refresh_s = 0  # every read sees the records as they are
    yield worklist
    worklist.close()


def analysed(wl: Worklist, study: str, findings, at):
    generation = wl.begin_analysis(uid(study), at)
    assert wl.finish_analysis(uid(study), generation, findings, [], AIStatus.DONE, "", at)


def items_by_uid(wl: Worklist, now, **kw):
    return {item.study_uid: item for item in wl.list_worklist(now, **kw)}


def test_a_study_is_recognised_by_ae_title_institution_name_or_stow_account(wl):
    wl.save_site(CITY, "admin", T0)
    wl.save_site(HILL, "admin", T0)
    wl.record_instance(meta("1", calling_ae="CITY_CT", institution="Somewhere Else"), T0)
    wl.record_instance(meta("2", calling_ae="UNKNOWN", institution="  city general   HOSPITAL "), T0)
    wl.record_instance(meta("3", calling_ae=f"{STOW_PREFIX}city-bridge", institution=""), T0)
    wl.record_instance(meta("4", calling_ae="HILL_DX"), T0)
    wl.record_instance(meta("5", calling_ae="UNKNOWN", institution="North"), T0)
    items = items_by_uid(wl, T0)
    assert items[uid("1")].site == "CITY HOSPITAL" and items[uid("1")].site_match == "calling AE title CITY_CT"
    assert items[uid("1")].institution == "Somewhere Else"
    assert items[uid("2")].site == "CITY HOSPITAL"
    assert items[uid("2")].site_match.startswith("Institution Name")
    assert items[uid("3")].site_match == "STOW-RS account city-bridge"
    assert items[uid("4")].site == "HILL CLINIC" and items[uid("4")].site_time_zone == "Asia/Kolkata"
    # No site claims it: listed under its Institution Name, with the default policy.
    assert items[uid("5")].site == "North" and items[uid("5")].site_match == ""


def test_site_rules_decide_the_level_and_the_target_and_are_named_in_the_reasons(wl):
    wl.save_site(CITY, "admin", T0)
    wl.record_instance(meta("1", calling_ae="CITY_CT"), T0)
    wl.record_instance(meta("2", calling_ae="OTHER"), T0)
    analysed(wl, "1", [ich()], T0)
    analysed(wl, "2", [ich()], T0)
    items = items_by_uid(wl, T0 + timedelta(minutes=1))
    city, other = items[uid("1")], items[uid("2")]
    # The city's rule raises a bleed to urgent only; the default policy to stat.
    assert city.priority.level is PriorityLevel.URGENT
    assert other.priority.level is PriorityLevel.STAT
    finding = next(r for r in city.priority.reasons if r.code == "ai-finding")
    assert finding.text.endswith("-> urgent [site CITY HOSPITAL]")
    assert next(r for r in other.priority.reasons if r.code == "ai-finding").text.endswith("[default policy]")
    # Targets: the city states only stat; urgent comes from the default (240 min).
    assert city.turnaround_target_min == 240


def test_a_sender_no_site_claims_gets_the_default_rules_even_when_it_writes_a_site_name(wl):
    """A registered site's contract belongs to the senders it recognises: another hospital whose Institution Name
    happens to be the site's name is listed under that name with the default policy, models and states."""
    wl.save_site(CITY, "admin", T0)  # recognised by AE title, account or "City General Hospital" only
    wl.record_instance(meta("1", calling_ae="ELSEWHERE", institution="CITY HOSPITAL"), T0)
    analysed(wl, "1", [ich()], T0)
    item = items_by_uid(wl, T0 + timedelta(minutes=1))[uid("1")]
    assert item.site == "CITY HOSPITAL" and item.site_match == ""
    assert item.priority.level is PriorityLevel.STAT  # the default policy's level, not the city's "urgent"
    finding = next(r for r in item.priority.reasons if r.code == "ai-finding")
    assert finding.text.endswith("[default policy]")
    assert wl.site_of(uid("1")) == ""  # models and model states: the service default
    assert wl.site_record(item.site, item.site_match) is None
    # Rescoring after a change of the city's rules leaves it alone.
    wl.update_site("CITY HOSPITAL", {"finding_levels": {"intracranial_haemorrhage": "routine"}}, "admin", T0)
    assert items_by_uid(wl, T0 + timedelta(minutes=1))[uid("1")].priority.level is PriorityLevel.STAT
    # A sender whose Institution Name is no registered site keeps it as its key for model states.
    wl.record_instance(meta("2", calling_ae="ELSEWHERE", institution="North"), T0)
    assert wl.site_of(uid("2")) == "North"


def test_changing_a_site_rescores_its_open_studies_and_never_lowers_below_clinical(wl):
    wl.save_site(CITY, "admin", T0)
    wl.record_instance(meta("1", calling_ae="CITY_CT"), T0)
    wl.record_instance(meta("2", calling_ae="CITY_CT", requested_priority="STAT"), T0)
    analysed(wl, "1", [ich()], T0)
    assert items_by_uid(wl, T0)[uid("1")].priority.level is PriorityLevel.URGENT
    site, moved, rescored = wl.update_site("CITY HOSPITAL", {"finding_levels": {"intracranial_haemorrhage": "stat"}},
                                           "admin", T0)  # fmt: skip
    assert rescored >= 1
    assert items_by_uid(wl, T0)[uid("1")].priority.level is PriorityLevel.STAT
    # A site that gives the finding "routine" raises nothing; the clinical stat request stays stat.
    wl.update_site("CITY HOSPITAL", {"finding_levels": {"intracranial_haemorrhage": "routine"}}, "admin", T0)
    items = items_by_uid(wl, T0)
    assert items[uid("1")].priority.level is PriorityLevel.ROUTINE
    assert items[uid("2")].priority.level is PriorityLevel.STAT
    # The stored order agrees with the recomputed levels (the SQL orders by the rescored columns).
    assert [i.study_uid for i in wl.list_worklist(T0)][0] == uid("2")


def test_registering_a_site_claims_the_open_studies_its_sender_already_sent(wl):
    wl.record_instance(meta("1", calling_ae="HILL_DX", institution="Hill"), T0)
    assert items_by_uid(wl, T0)[uid("1")].site == "Hill"
    moved, _ = wl.save_site(HILL, "admin", T0)
    assert moved == 1
    assert items_by_uid(wl, T0)[uid("1")].site == "HILL CLINIC"
    assert any(h.kind == "site-changed" for h in wl.get_study(uid("1"), T0).history)
    wl.remove_site("HILL CLINIC", "admin", T0)
    assert items_by_uid(wl, T0)[uid("1")].site == "Hill"


def test_site_records_are_checked_and_a_sender_belongs_to_one_site(wl):
    wl.save_site(CITY, "admin", T0)
    with pytest.raises(ConflictError, match="CITY_CT"):
        wl.save_site(parse_site({"name": "B", "ae_titles": ["CITY_CT"]}), "admin", T0)
    with pytest.raises(ConflictError, match="exists already"):
        wl.save_site(CITY, "admin", T0, create=True)
    with pytest.raises(InvalidSiteError, match="time zone"):
        parse_site({"name": "C", "time_zone": "Mars/Olympus"})
    with pytest.raises(InvalidSiteError, match="unknown priority level"):
        parse_site({"name": "C", "turnaround_min": {"asap": 10}})
    with pytest.raises(InvalidSiteError, match="AE title"):
        parse_site({"name": "C", "ae_titles": ["A" * 17]})
    with pytest.raises(NotFoundError):
        wl.update_site("NOPE", {"time_zone": "UTC"}, "admin", T0)
    with Session(wl.engine) as session:
        actions = session.execute(select(AuditRow.action)).scalars().all()
    assert "site-add" in actions


def test_privileges_scope_what_a_radiologist_sees_and_may_claim(wl):
    wl.save_site(CITY, "admin", T0)
    wl.save_site(HILL, "admin", T0)
    wl.record_instance(meta("1", calling_ae="CITY_CT"), T0)
    wl.record_instance(meta("2", calling_ae="HILL_DX"), T0)
    wl.record_instance(meta("3", calling_ae="UNKNOWN"), T0)
    wl.sites.grant("rad1", "CITY HOSPITAL", date(2026, 3, 1), "admin", T0)
    wl.sites.grant("rad1", "HILL CLINIC", date(2026, 2, 28), "admin", T0)  # expired yesterday
    readable = wl.sites.readable_by("rad1", T0.date())
    assert readable == {"CITY HOSPITAL"}
    scope = ReadScope(frozenset(readable), unregistered=True)
    assert set(items_by_uid(wl, T0, scope=scope)) == {uid("1"), uid("3")}
    strict = ReadScope(frozenset(readable), unregistered=False)
    assert set(items_by_uid(wl, T0, scope=strict)) == {uid("1")}
    assert wl.sites.readable_by("rad1", date(2026, 3, 2)) == set()  # the day after "until"
    with pytest.raises(NotPermittedError, match="HILL CLINIC"):
        wl.claim(uid("2"), "rad1", T0, scope)
    with pytest.raises(NotPermittedError):
        wl.check_scope(uid("3"), strict)
    wl.claim(uid("1"), "rad1", T0, scope)
    assert items_by_uid(wl, T0)[uid("1")].claimed_by == "rad1"


def test_next_study_gives_the_top_unclaimed_study_the_reader_may_read(wl):
    wl.save_site(CITY, "admin", T0)
    wl.save_site(HILL, "admin", T0)
    wl.record_instance(meta("1", calling_ae="HILL_DX", requested_priority="STAT"), T0)
    # The urgent study is also the older one: first under any order (urgent and routine go in arrival order).
    wl.record_instance(meta("3", calling_ae="CITY_CT", requested_priority="URGENT"), T0)
    wl.record_instance(meta("2", calling_ae="CITY_CT"), T0 + timedelta(minutes=1))
    scope = ReadScope(frozenset({"CITY HOSPITAL"}), unregistered=False)
    now = T0 + timedelta(minutes=2)
    first = wl.next_study("rad1", now, scope)
    assert first is not None and first.study_uid == uid("3")  # the stat one is HILL's: not for rad1
    second = wl.next_study("rad1", now, scope)
    assert second is not None and second.study_uid == uid("2")
    assert wl.next_study("rad1", now, scope) is None
    assert wl.next_study("rad2", now, None).study_uid == uid("1")


def test_next_study_under_concurrency_never_assigns_a_study_twice(wl):
    for n in range(30):
        wl.record_instance(meta(f"c{n}", calling_ae="X"), T0 + timedelta(seconds=n))
    got: list[str | None] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(20)

    def press(reader: int) -> None:
        try:
            barrier.wait()
            item = wl.next_study(f"rad{reader}", T0 + timedelta(minutes=5))
            got.append(item.study_uid if item else None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=press, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assigned = [g for g in got if g]
    assert len(assigned) == 20 and len(set(assigned)) == 20
    # The 20 oldest (the order of an all-routine worklist), each claimed by the one who got it.
    assert set(assigned) == {uid(f"c{n}") for n in range(20)}
    claimants = {i.study_uid: i.claimed_by for i in wl.list_worklist(T0 + timedelta(minutes=5))}
    assert len({claimants[u] for u in assigned}) == 20


def test_an_idle_claim_is_released_after_the_site_limit_with_a_note(wl):
    wl.save_site(CITY, "admin", T0)  # claim_idle_min 10
    wl.record_instance(meta("1", calling_ae="CITY_CT"), T0)
    wl.record_instance(meta("2", calling_ae="OTHER"), T0)
    wl.claim(uid("1"), "rad1", T0)
    wl.claim(uid("2"), "rad1", T0)
    wl.touch_claim(uid("1"), "rad1", T0 + timedelta(minutes=5))  # opened again: active at +5
    assert wl.release_idle_claims(T0 + timedelta(minutes=14), default_idle_min=30) == []
    assert wl.release_idle_claims(T0 + timedelta(minutes=16), default_idle_min=30) == [uid("1")]
    assert wl.release_idle_claims(T0 + timedelta(minutes=31), default_idle_min=30) == [uid("2")]
    released = [h for h in wl.get_study(uid("1"), T0).history if h.kind == "released"][-1]
    assert "idle" in released.detail["note"] and "CITY HOSPITAL" in released.detail["note"]
    assert released.detail["claimed_by"] == "rad1"


def test_an_order_joins_its_study_whichever_arrives_first_and_only_raises_the_clinical_floor(wl):
    from triage.domain import ClinicalOrder

    stat_order = ClinicalOrder("ACC7", "ORM^O01", control_id="MSG7", priority="stat", reason="sudden headache, GCS 13")
    # The order first: it waits for its study.
    assert wl.record_order(stat_order, T0) is None
    wl.record_instance(meta("7", accession_number="ACC7"), T0 + timedelta(minutes=1))
    item = wl.get_study(uid("7"), T0 + timedelta(minutes=1))
    assert item.clinical_priority == "stat" and item.indication == "sudden headache, GCS 13"
    assert item.priority.reasons[0].text == "clinical priority: stat (from order ORM^O01 MSG7)"
    # The study first: the order joins it at once. A routine order never lowers an urgent request.
    wl.record_instance(meta("8", accession_number="ACC8", requested_priority="URGENT"), T0)
    routine = ClinicalOrder("ACC8", "OMI^O23", control_id="MSG8", priority="routine", reason="follow-up")
    assert wl.record_order(routine, T0) == uid("8")
    item = wl.get_study(uid("8"), T0)
    assert item.clinical_priority == "urgent" and item.indication == "follow-up"
    assert [h.kind for h in item.history].count("order-joined") == 1
    # A cancel is recorded; the study stays listed as it was.
    wl.record_order(ClinicalOrder("ACC8", "ORM^O01", control_id="MSG9", order_control="CA"), T0)
    assert [h.kind for h in wl.get_study(uid("8"), T0).history][-1] == "order-cancelled"
    assert uid("8") in items_by_uid(wl, T0)
    with pytest.raises(ValueError, match="accession"):
        wl.record_order(ClinicalOrder("", "ORM^O01"), T0)


def test_an_order_joins_within_its_site_or_by_study_uid_and_never_guesses_between_studies(wl):
    """Hospitals number their accessions independently: an order joins a study of its own ordering site, the study
    it names by Study Instance UID, and none when several could be meant."""
    from triage.domain import ClinicalOrder

    wl.save_site(CITY, "admin", T0)
    wl.save_site(HILL, "admin", T0)
    wl.record_instance(meta("1", calling_ae="CITY_CT", accession_number="A100"), T0)
    wl.record_instance(meta("2", calling_ae="HILL_DX", accession_number="A100"), T0)
    # From the city (ORC-21 names its institution): the city's study, not the clinic's.
    city_order = ClinicalOrder(
        "A100", "ORM^O01", control_id="C1", priority="stat", ordering_site="City General Hospital"
    )
    assert wl.record_order(city_order, T0) == uid("1")
    assert wl.get_study(uid("2"), T0).clinical_priority == "routine"
    # From a RIS no site is recognised by: two open studies have the accession, so it joins neither.
    unknown = ClinicalOrder("A100", "ORM^O01", control_id="U1", priority="stat", sending_facility="Somewhere")
    assert wl.record_order(unknown, T0) is None
    clinic = wl.get_study(uid("2"), T0)
    assert clinic.clinical_priority == "routine"
    assert [h.kind for h in clinic.history][-1] == "order-ambiguous"
    assert "order-ambiguous" in [h.kind for h in wl.get_study(uid("1"), T0).history]
    # The Study Instance UID the RIS assigned decides, whatever the accession says.
    by_uid = ClinicalOrder("A100", "OMI^O23", control_id="U2", priority="urgent", study_instance_uid=uid("2"))
    assert wl.record_order(by_uid, T0) == uid("2")
    assert wl.get_study(uid("2"), T0).clinical_priority == "urgent"
    # Orders waiting for their study: the clinic's study does not take the city's order, the city's does.
    waiting = ClinicalOrder(
        "B200", "ORM^O01", control_id="C2", priority="stat", sending_facility="City General Hospital"
    )
    assert wl.record_order(waiting, T0) is None
    wl.record_instance(meta("3", calling_ae="HILL_DX", accession_number="B200"), T0)
    assert wl.get_study(uid("3"), T0).clinical_priority == "routine"
    wl.record_instance(meta("4", calling_ae="CITY_CT", accession_number="B200"), T0)
    assert wl.get_study(uid("4"), T0).clinical_priority == "stat"
    # An order naming a study that has not arrived joins that study only, not another with its accession.
    ahead = ClinicalOrder("C300", "OMI^O23", control_id="U3", priority="stat", study_instance_uid=uid("6"))
    assert wl.record_order(ahead, T0) is None
    wl.record_instance(meta("5", calling_ae="CITY_CT", accession_number="C300"), T0)
    assert wl.get_study(uid("5"), T0).clinical_priority == "routine"
    wl.record_instance(meta("6", calling_ae="CITY_CT", accession_number="C999"), T0)
    assert wl.get_study(uid("6"), T0).clinical_priority == "stat"


def test_a_site_sets_its_own_quick_reads(wl):
    """A site may turn the quick-read head start off (or change it) for its own studies; others keep the default."""
    wl.save_site(parse_site({"name": "NO QUICK", "ae_titles": ["NQ_DX"], "quick_read_head_start_min": 0}), "a", T0)
    wl.record_instance(meta("1", calling_ae="NQ_DX", modality="DX"), T0)
    wl.record_instance(meta("2", calling_ae="OTHER", modality="DX"), T0)
    items = items_by_uid(wl, T0 + timedelta(minutes=5))
    assert all(r.code != "quick-read" for r in items[uid("1")].priority.reasons)
    assert items[uid("1")].priority.score == pytest.approx(5.0)
    assert any(r.code == "quick-read" for r in items[uid("2")].priority.reasons)
    assert items[uid("2")].priority.score == pytest.approx(20.0)
    # The SQL order agrees: the unregistered sender's radiograph, 15 min ahead, comes first.
    assert [i.study_uid for i in wl.list_worklist(T0 + timedelta(minutes=5))][:2] == [uid("2"), uid("1")]
    with pytest.raises(InvalidSiteError, match="quick_read_head_start_min"):
        parse_site({"name": "BAD", "quick_read_head_start_min": 120})


def test_an_in_memory_worklist_never_rereads_its_sites_inside_a_write():
    """`triage infer` keeps its worklist in memory, on one shared connection: the site records are read again only
    after this process changed them, never on the timer in the middle of recording an analysis."""
    worklist = Worklist.open("sqlite://", SETTINGS)
    worklist.sites.refresh_s = 0  # every timer would have expired
    try:
        worklist.save_site(HILL, "admin", T0)
        worklist.record_instance(meta("1", calling_ae="ELSEWHERE", institution="North"), T0)
        worklist.record_instance(meta("2", calling_ae="HILL_DX"), T0)
        for study in ("1", "2"):
            analysed(worklist, study, [ich()], T0)
        items = items_by_uid(worklist, T0)
        assert items[uid("1")].ai_status == "done" and items[uid("2")].site == "HILL CLINIC"
    finally:
        worklist.close()
