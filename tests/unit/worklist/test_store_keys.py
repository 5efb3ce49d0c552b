"""The index holds store keys: batched recording (the store's group commit) and the migration from paths."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, text

from triage.config import PrioritySettings
from triage.domain import AIStatus, InstanceMeta
from triage.storage import instance_key
from triage.worklist.db import create_engine_for, migrate
from triage.worklist.events import Broadcaster
from triage.worklist.repository import Worklist

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"


def meta(study: str, series: str, n: int, **kw: str) -> InstanceMeta:
    study_uid, series_uid, sop = (
        f"1.2.826.0.1.{study}",
        f"1.2.826.0.1.{study}.{series}",
        f"1.2.826.0.1.{study}.{series}.{n}",
    )
    fields = {"modality": "CT", "calling_ae": "MODALITY1", **kw}
    return InstanceMeta(study_uid, series_uid, sop, CT, key=instance_key(study_uid, series_uid, sop), **fields)


@pytest.fixture
def wl(engine) -> Worklist:
    return Worklist(engine, PrioritySettings(), Broadcaster())


def test_a_batch_records_every_instance_once_and_reports_duplicates_in_order(wl: Worklist):
    assert wl.record_instance(meta("1", "1", 1), T0) is True
    batch = [meta("2", "1", 1), meta("1", "1", 1), meta("1", "1", 2), meta("2", "1", 1), meta("2", "2", 1)]

    results = wl.record_instances([(m, T0) for m in batch])

    # The second copy of 2.1.1 in the same batch, and 1.1.1 indexed before, are duplicates.
    assert results == [True, False, True, False, True]
    items = {i.study_uid: i for i in wl.list_worklist(T0)}
    assert items["1.2.826.0.1.1"].instance_count == 2
    assert items["1.2.826.0.1.2"].instance_count == 2
    series = {s.series_uid: s for s in wl.series_of("1.2.826.0.1.1")}
    assert series["1.2.826.0.1.1.1"].files == (
        "1.2.826.0.1.1/1.2.826.0.1.1.1/1.2.826.0.1.1.1.1.dcm",
        "1.2.826.0.1.1/1.2.826.0.1.1.1/1.2.826.0.1.1.1.2.dcm",
    )


def test_a_batch_with_a_bad_instance_records_nothing(wl: Worklist):
    with pytest.raises(ValueError):
        wl.record_instances([(meta("3", "1", 1), T0), (meta("3", "1", 2), datetime(2026, 3, 1))])  # naive time
    assert wl.list_worklist(T0) == []


def test_instances_batched_after_the_analysis_began_queue_a_new_one(wl: Worklist):
    wl.record_instance(meta("4", "1", 1), T0)
    generation = wl.begin_analysis("1.2.826.0.1.4", T0)
    wl.record_instances([(meta("4", "1", 2), T0), (meta("4", "1", 3), T0)])
    wl.finish_analysis("1.2.826.0.1.4", generation, [], [], AIStatus.DONE, "analysed", T0)

    (item,) = wl.list_worklist(T0)
    assert item.instance_count == 3
    assert wl.studies_ready(0.0, T0 + timedelta(minutes=1)) == ["1.2.826.0.1.4"]


def test_migration_0007_turns_absolute_paths_into_store_keys(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    migrate(url, "0004")
    engine = create_engine(url)
    study, series, sop = "1.2.3", "1.2.3.4", "1.2.3.4.5"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO studies (study_uid, accession_number, patient_hash, modality, study_description, site,"
                " sending_ae, received_at, last_instance_at, instance_count, clinical_priority,"
                " clinical_priority_source, ai_status, ai_reason, analysis_generation, analysing_generation,"
                " analysed_generation, findings, routing, priority_level, priority_reasons)"
                " VALUES (:s, '', '', 'CT', '', '', '', :t, :t, 1, 'routine', 'default', 'pending', '', 1, 0, 0,"
                " '[]', '[]', 'routine', '[]')"
            ),
            {"s": study, "t": T0.isoformat()},
        )
        conn.execute(
            text(
                "INSERT INTO series (series_uid, study_uid, modality, sop_class_uid, description, n_instances,"
                " attributes) VALUES (:se, :s, 'CT', :c, '', 1, '{}')"
            ),
            {"se": series, "s": study, "c": CT},
        )
        conn.execute(
            text(
                "INSERT INTO instances (sop_instance_uid, series_uid, study_uid, sop_class_uid, path,"
                " transfer_syntax, received_at) VALUES (:i, :se, :s, :c, :p, '', :t)"
            ),
            {
                "i": sop,
                "se": series,
                "s": study,
                "c": CT,
                "p": f"/srv/triage/var/dicom/{study}/{series}/{sop}.dcm",
                "t": T0.isoformat(),
            },
        )
    engine.dispose()

    migrate(url)

    engine = create_engine_for(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT store_key FROM instances")).scalar_one() == f"{study}/{series}/{sop}.dcm"
        wl = Worklist(engine, PrioritySettings(), Broadcaster())
        (info,) = wl.series_of(study)
        assert info.files == (f"{study}/{series}/{sop}.dcm",)
    finally:
        engine.dispose()
