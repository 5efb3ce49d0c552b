"""A real `triage serve` (in-process runner) receiving MR, US and multi-frame studies over dcmtk's storescu:
no model reads them, and each is listed at its clinical priority as not analysed, saying why ("no model for MR")."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dicom_factory import write_datasets
from tests.dicom_modalities import make_enhanced_mr, make_mr_series, make_us_image
from tests.integration.conftest import Server, start_server, stop_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def inprocess_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("modalities") / "data", runner="inprocess")
    try:
        yield server
    finally:
        stop_server(server)


def _listed(study_uid: str):  # type: ignore[no-untyped-def]
    def find(items: list[dict]) -> dict | None:
        item = next((i for i in items if i["study_uid"] == study_uid), None)
        return item if item and item["ai_status"] not in ("pending", "running") else None

    return find


def test_mr_us_and_multiframe_studies_are_listed_not_analysed_at_their_priority(
    inprocess_server: Server, tmp_path: Path
) -> None:
    mr = make_mr_series(4)
    for ds in mr:
        ds.RequestedProcedurePriority = "STAT"
    enhanced = make_enhanced_mr(5)
    us = make_us_image(frames=4)
    sent = {"MR": mr, "enhanced MR": [enhanced], "US": [us]}
    for name, datasets in sent.items():
        write_datasets(datasets, tmp_path / name.replace(" ", "-"))

    result = inprocess_server.storescu(tmp_path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr

    items = {
        name: inprocess_server.wait_for(
            _listed(str(datasets[0].StudyInstanceUID)), timeout_s=180, what=f"the {name} study"
        )
        for name, datasets in sent.items()
    }
    for name, item in items.items():
        assert item["ai_status"] == "not-applicable", f"{name}: {item['ai_status']}: {item['ai_reason']}"
        assert item["findings"] == []
    assert "no model for MR" in items["MR"]["ai_reason"], items["MR"]["ai_reason"]
    assert "no model for MR" in items["enhanced MR"]["ai_reason"], items["enhanced MR"]["ai_reason"]
    assert "no model for US" in items["US"]["ai_reason"], items["US"]["ai_reason"]
    assert items["MR"]["priority"]["level"] == "stat"  # its clinical priority: an AI that cannot run lowers nothing
    assert items["US"]["priority"]["level"] == "routine"
