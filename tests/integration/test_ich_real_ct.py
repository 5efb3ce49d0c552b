"""ct-head-ich end to end on the real head CT and on a copy with a synthetic hyperdense insert.

Real ONNX members, real preprocessing, real DICOM files; one member (the CPU default) so the module stays near a
minute with OpenVINO. This checks the pipeline (a clear insert is found and flagged, the untouched scan is not), not
clinical accuracy: there is one real scan and no labels.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from triage.config import REPO_ROOT, Settings
from triage.domain import Finding, SeriesInfo
from triage.models.registry import ModelRegistry
from triage.models.runtime import load_members
from triage.pipelines.base import pipeline_for
from triage.training.synth_ich import InsertedBleed, insert_haemorrhage

pytestmark = [pytest.mark.slow]

HEAD_CT_DIRS = (REPO_ROOT / "tests" / "data" / "ct-head-ge", Path("/work/shared/data/ct-head-ge"))


@pytest.fixture(scope="module")
def head_ct() -> Path:
    for candidate in HEAD_CT_DIRS:
        if candidate.is_dir():
            return candidate
    pytest.skip(f"no real head CT in {[str(d) for d in HEAD_CT_DIRS]}")


@pytest.fixture(scope="module")
def analyse():
    model = ModelRegistry(REPO_ROOT / "weights").get("ct-head-ich")
    pipeline = pipeline_for(model.card)
    members = load_members(model, Settings().inference.providers, members=1)

    def _run(series_dir: Path) -> tuple[Finding, SeriesInfo]:
        files = tuple(sorted(str(p) for p in series_dir.glob("*.dcm")))
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        series = SeriesInfo(str(first.SeriesInstanceUID), "CT", str(first.SOPClassUID), len(files), files)
        prepared = pipeline.preprocess(series)
        (finding,) = pipeline.postprocess(prepared, pipeline.infer(prepared, members), series)
        return finding, series

    return _run


@pytest.fixture(scope="module")
def original(analyse, head_ct: Path) -> Finding:
    return analyse(head_ct)[0]


@pytest.fixture(scope="module")
def inserted(tmp_path_factory: pytest.TempPathFactory, head_ct: Path) -> InsertedBleed:
    return insert_haemorrhage(head_ct, tmp_path_factory.mktemp("ich") / "study", volume_ml=5.0, seed=0)


@pytest.fixture(scope="module")
def altered(analyse, inserted: InsertedBleed) -> tuple[Finding, SeriesInfo]:
    return analyse(inserted.out_dir)


def test_real_scan_gives_a_complete_unflagged_finding(original: Finding) -> None:
    assert original.label == "intracranial_haemorrhage"
    assert original.model == "ct-head-ich" and original.model_version == "1.0.0" and not original.synthetic
    assert 0.0 <= original.probability < 0.5
    assert not original.flagged
    details = original.details
    assert details["members_run"] == 1
    assert details["tiles_run"] > 0 and details["tiles_skipped"] >= 0
    assert set(details["class_volumes_ml"]) == {"IPH", "EAH", "IVH"}
    assert details["volume_ml"] < 1.0
    assert "oedema_ml" in details


def test_synthetic_insert_is_found_where_it_was_put(
    altered: tuple[Finding, SeriesInfo], inserted: InsertedBleed
) -> None:
    finding, series = altered
    assert finding.flagged and finding.probability > 0.9
    assert finding.series_uid == inserted.series_uid == series.series_uid
    details = finding.details
    # Most of the insert is segmented as blood, and not wildly more than was inserted.
    assert 0.5 * inserted.volume_ml <= details["volume_ml"] <= 2.0 * inserted.volume_ml
    assert details["subtype"] in {"IPH", "EAH", "IVH"}
    first, last = details["slice_range"]
    assert first <= min(inserted.slices) + 1 and last >= max(inserted.slices) - 1
    assert details["instance_number_range"][0] <= details["instance_number_range"][1]
    overlay = finding.overlay
    assert overlay is not None and overlay.mask.max() == 1.0
    # The key slice is one the insert touches, and the mask lies on that slice's own pixel grid.
    assert overlay.sop_instance_uid in {inserted.sop_instance_uids[i] for i in inserted.slices}
    assert overlay.mask.shape == (512 // overlay.stride, 512 // overlay.stride)
