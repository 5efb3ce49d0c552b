"""The API's JSON reads back into the records it documents: the CLI's worklist client uses them, no dict guessing."""

from __future__ import annotations

from pydantic import TypeAdapter
from rich.console import Console
from serve_site import Site, ich_finding

from triage.cli import render_worklist
from triage.worklist.repository import StudyDetail, WorklistItem


def test_worklist_and_study_json_validate_into_the_documented_records(site: Site) -> None:
    study_uid, datasets = site.add_ct("ACC-TYPED")
    key = datasets[3]
    site.finish(study_uid, [ich_finding(str(key.SOPInstanceUID), str(key.SeriesInstanceUID), None)])
    site.sign_in()
    items = TypeAdapter(list[WorklistItem]).validate_python(site.client.get("/api/v1/worklist").json())
    (item,) = items
    assert item.priority.level == "stat" and item.findings[0].label == "intracranial_haemorrhage"
    assert item.findings[0].overlay_sop_instance_uid == str(key.SOPInstanceUID)
    detail = StudyDetail.model_validate(site.client.get(f"/api/v1/studies/{study_uid}").json())
    assert [run.status for run in detail.analyses] == ["done"]
    assert detail.series[0].routing is not None and detail.series[0].routing.model == "ct-head-ich"
    console = Console(record=True, width=400)
    console.print(render_worklist(items, "worklist"))
    text = console.export_text()
    assert "FLAG intracranial_haemorrhage p=0.93" in text and "intraparenchymal, 12.5 mL" in text
