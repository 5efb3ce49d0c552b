"""The worklist's SQL order against the policy's own Python order, on SQLite and PostgreSQL.

`list_worklist` filters, orders and pages in the database from stored queue columns; these tests build
random (seeded) worklists through the repository's write paths and check that, for several read times
including the exact instants where waiting promotes a study, the database returns exactly the order that
sorting every study by `compute_priority` gives, filters and pages included.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from triage.config import PrioritySettings
from triage.domain import AIStatus, InstanceMeta, PriorityLevel
from triage.worklist.db import create_engine_for, migrate
from triage.worklist.priority import compute_priority, queue_order, sort_key
from triage.worklist.repository import Worklist, load_findings
from triage.worklist.tables import Study

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"
SETTINGS = PrioritySettings(
    finding_levels={"intracranial_haemorrhage": "stat", "fracture": "urgent", "pneumothorax": "stat"},
    turnaround_min={"stat": 60, "urgent": 240, "routine": 1440},
    promote_at_fraction=0.75,
)
# Another site's policy: no routine target (routine studies never promote), other fractions.
OTHER = PrioritySettings(
    finding_levels={"intracranial_haemorrhage": "urgent", "fracture": "stat"},
    turnaround_min={"stat": 45, "urgent": 100},
    promote_at_fraction=0.5,
)


def finding(
    label: str, flagged: bool, model: str = "ct-head-ich", synthetic: bool = False, shadow: bool = False
) -> dict:
    return {
        "label": label,
        "probability": 0.9 if flagged else 0.1,
        "flagged": flagged,
        "model": model,
        "model_version": "1.0.0",
        "synthetic": synthetic,
        "shadow": shadow,
        "details": {},
    }


FINDINGS = [
    [],
    [finding("intracranial_haemorrhage", True)],
    [finding("intracranial_haemorrhage", False)],
    [finding("fracture", True, "xr-fracture")],
    [finding("nodule", True, "ct-chest-nodule")],  # the site gives it no level
    [finding("pneumothorax", True, "xr-chest-pneumothorax", synthetic=True, shadow=True)],
    [finding("pneumothorax", True, "xr-chest-pneumothorax", synthetic=True)],
    [finding("fracture", True, "xr-fracture"), finding("intracranial_haemorrhage", True)],
]


def meta(n: int, rng: random.Random) -> InstanceMeta:
    study = f"1.2.826.0.9.{n}"
    return InstanceMeta(
        study_uid=study,
        series_uid=f"{study}.1",
        sop_instance_uid=f"{study}.1.1",
        sop_class_uid=CT,
        modality=rng.choice(["CT", "CR", "DX", "MR"]),
        key=f"{study}/{study}.1/{study}.1.1.dcm",
        accession_number=f"ACC{n}",
        patient_hash="3f2a9c",
        study_description="",
        institution=rng.choice(["North", "South"]),
        calling_ae=rng.choice(["MODALITY1", "MODALITY1", "ER_CT"]),
        requested_priority=rng.choice(["", "", "ROUTINE", "HIGH", "STAT"]),
    )


def populate(wl: Worklist, seed: int, n: int = 70) -> list[datetime]:
    """`n` studies in every state the worklist shows; returns their arrival times."""
    rng = random.Random(seed)
    arrivals: list[datetime] = []
    for i in range(n):
        if arrivals and rng.random() < 0.15:
            received = arrivals[-1]  # the same arrival time: ties fall to the Study Instance UID
        else:
            # A third within the last two and a half hours, where quick reads start ahead and long waits begin.
            span = 150 if rng.random() < 0.35 else 3 * 1440
            received = T0 - timedelta(minutes=rng.uniform(0, span), microseconds=rng.randrange(1_000_000))
        arrivals.append(received)
        m = meta(i, rng)
        wl.record_instance(m, received)
        uid, at = m.study_uid, received + timedelta(minutes=1)
        outcome = rng.choice(["pending", "analysing", "done", "done", "done", "failed", "not-applicable", "retry"])
        if outcome == "pending":
            continue
        gen = wl.begin_analysis(uid, at)
        if outcome == "done":
            wl.finish_analysis(uid, gen, rng.choice(FINDINGS), [], AIStatus.DONE, "", at)
            if rng.random() < 0.2:
                wl.requeue(uid, at, user="admin")  # keeps its findings until the new analysis ends
        elif outcome == "failed":
            wl.finish_analysis(uid, gen, [], [], AIStatus.FAILED, "worker died", at)
        elif outcome == "not-applicable":
            wl.finish_analysis(uid, gen, [], [], AIStatus.NOT_APPLICABLE, "no model", at)
        elif outcome == "retry":
            wl.defer_analysis(uid, gen, "out of memory; retrying", at + timedelta(minutes=1), at)
        if rng.random() < 0.1:
            wl.claim(uid, "dr_a", at)
        if rng.random() < 0.1:
            wl.mark_reported(uid, "dr_a", at)
    return arrivals


def python_order(wl: Worklist, now: datetime, include_reported: bool = False, level: str | None = None):
    """Every study sorted by the policy itself, as the worklist did before it ordered in SQL."""
    with Session(wl.engine) as session:
        studies = session.execute(select(Study)).scalars().all()
    ranked = []
    for s in studies:
        if s.reported_at is not None and not include_reported:
            continue
        priority = compute_priority(
            PriorityLevel(s.clinical_priority), load_findings(s.findings), s.ai_status, s.received_at, now,
            wl.settings, modality=s.modality,
        )  # fmt: skip
        if level and priority.level != level:
            continue
        ranked.append(((*sort_key(priority, s.received_at), s.study_uid), s.study_uid, priority.level.value))
    ranked.sort()
    return [(uid, lvl) for _, uid, lvl in ranked]


def sql_order(wl: Worklist, now: datetime, **kw):
    return [(i.study_uid, i.priority.level.value) for i in wl.list_worklist(now, **kw)]


def read_times(wl: Worklist, arrivals: list[datetime]) -> list[datetime]:
    """Ordinary read times, and the microsecond before and at which some study is promoted."""
    times = [T0, T0 + timedelta(minutes=17, microseconds=3), T0 + timedelta(hours=9), T0 + timedelta(days=4)]
    for received in arrivals[:6]:
        for base in (PriorityLevel.ROUTINE, PriorityLevel.URGENT):
            promote_at = queue_order(base, received, wl.settings).promote_at
            if promote_at is not None:
                times += [promote_at - timedelta(microseconds=1), promote_at]
    return times


@pytest.mark.parametrize("seed", [1, 2])
def test_sql_order_equals_the_policy_order(engine, seed):
    wl = Worklist(engine, SETTINGS, sender_priority={"ER_CT": "stat"})
    arrivals = populate(wl, seed)
    for now in read_times(wl, arrivals):
        expected = python_order(wl, now)
        assert sql_order(wl, now) == expected, now
        assert sql_order(wl, now, include_reported=True) == python_order(wl, now, include_reported=True), now
    # Every level occurs, and waiting promotes somebody by the last read, so the test covers what it claims.
    early = dict(python_order(wl, T0))
    late = dict(python_order(wl, T0 + timedelta(days=4)))
    assert set(early.values()) == {"routine", "urgent", "stat"}
    assert any(early[uid] != late[uid] for uid in early)
    # Radiographs (CR, DX) start ahead as quick reads, in SQL as in Python.
    codes = {r.code for item in wl.list_worklist(T0) for r in item.priority.reasons}
    assert "quick-read" in codes


def test_level_filter_and_pages_come_from_the_same_order(engine):
    wl = Worklist(engine, SETTINGS, sender_priority={"ER_CT": "stat"})
    populate(wl, 3)
    now = T0 + timedelta(hours=5)
    full = sql_order(wl, now)
    for level in ("routine", "urgent", "stat"):
        assert sql_order(wl, now, level=level) == python_order(wl, now, level=level)
        assert sql_order(wl, now, level=level) == [row for row in full if row[1] == level]
    pages = [sql_order(wl, now, limit=9, offset=k) for k in range(0, len(full) + 9, 9)]
    assert [row for page in pages for row in page] == full
    assert sql_order(wl, now, limit=0) == []
    with pytest.raises(ValueError, match="negative"):
        wl.list_worklist(now, offset=-1)


def test_a_changed_policy_rescores_the_stored_order_when_the_worklist_is_built(engine):
    first = Worklist(engine, SETTINGS, sender_priority={"ER_CT": "stat"})
    arrivals = populate(first, 4)
    other = Worklist(engine, OTHER)  # the next run's settings
    for now in read_times(other, arrivals):
        assert sql_order(other, now) == python_order(other, now), now
    assert Worklist(engine, OTHER).rescore_studies() == 0  # nothing stale left


def test_an_upgraded_database_orders_its_existing_studies(fresh_db_url):
    """Studies stored before revision 0006 have no queue columns; the first worklist built computes them."""
    migrate(fresh_db_url, "0004")
    engine = create_engine_for(fresh_db_url)
    try:
        rng = random.Random(5)
        rows = []
        for n in range(30):
            received = T0 - timedelta(minutes=rng.uniform(0, 2000), microseconds=rng.randrange(1_000_000))
            rows.append(
                {
                    "uid": f"1.2.826.0.7.{n}",
                    "received": received if engine.dialect.name == "postgresql" else received.replace(tzinfo=None),
                    "clinical": rng.choice(["routine", "urgent", "stat"]),
                }
            )
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO studies (study_uid, accession_number, patient_hash, modality, study_description,"
                    " site, sending_ae, received_at, last_instance_at, instance_count, clinical_priority,"
                    " clinical_priority_source, ai_status, ai_reason, analysis_generation, analysing_generation,"
                    " analysed_generation, findings, routing, priority_level, priority_reasons) VALUES (:uid, '',"
                    " '', 'CT', '', '', '', :received, :received, 1, :clinical, 'default', 'pending', '', 1, 0, 0,"
                    " '[]', '[]', :clinical, '[]')"
                ),
                rows,
            )
        migrate(fresh_db_url)
        wl = Worklist(engine, SETTINGS)
        for now in (T0, T0 + timedelta(hours=7), T0 + timedelta(days=2)):
            expected = python_order(wl, now)
            assert len(expected) == 30
            assert sql_order(wl, now) == expected, now
    finally:
        engine.dispose()
