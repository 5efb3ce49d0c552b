"""Results as standard objects (highdicom): the SEG of a finding on the real tilted, unevenly spaced head CT and the
TID 1500 measurement report, read back with highdicom and checked with dciodvfy (dicom3tools)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from tests.dicom_factory import make_radiograph, write_dataset
from triage.dicom.measurements import (
    NOT_FOR_DIAGNOSIS,
    SYNTHETIC_NOTICE,
    build_measurement_report,
    build_segmentation,
    finding_code,
)
from triage.dicom.results import build_study_results
from triage.domain import Finding, Overlay, SliceMasks
from triage.storage import LocalStore, overlay_bytes, segmentation_bytes

HEAD_CT = Path(__file__).resolve().parents[2] / "data" / "ct-head-ge"
CODES = {
    "intracranial_haemorrhage": ("1386000", "SCT", "Intracranial hemorrhage"),
    "pneumothorax": ("36118008", "SCT", "Pneumothorax"),
}


def head_ct() -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(HEAD_CT.glob("*.dcm"))]


def bleed(series: list[Dataset], synthetic: bool = False) -> tuple[Finding, SliceMasks]:
    chosen = series[10:14]
    masks = np.zeros((len(chosen), int(series[0].Rows), int(series[0].Columns)), dtype=bool)
    masks[:, 200:240, 230:270] = True
    finding = Finding(
        label="intracranial_haemorrhage", probability=0.97, flagged=True, model="ct-head-ich", model_version="1.0.0",
        synthetic=synthetic, series_uid=str(series[0].SeriesInstanceUID),
        details={"volume_ml": 8.1, "class_volumes_ml": {"IPH": 8.0, "EAH": 0.1, "IVH": 0.0},
                 "centroid_lps_mm": [10.5, -20.0, 35.25]},
    )  # fmt: skip
    return finding, SliceMasks([str(ds.SOPInstanceUID) for ds in chosen], masks)


def texts(item: Dataset, code: str) -> list[str]:
    """Every TEXT value under `item` whose concept name has code value `code`."""
    found = []
    for child in item.get("ContentSequence", []):
        if child.ValueType == "TEXT" and child.ConceptNameCodeSequence[0].CodeValue == code:
            found.append(str(child.TextValue))
        found += texts(child, code)
    return found


def dciodvfy_errors(ds: Dataset, tmp_path: Path) -> list[str]:
    """dciodvfy's error lines for `ds` (warnings are not errors); skipped where dicom3tools is not installed."""
    binary = shutil.which("dciodvfy")
    if binary is None:
        if os.environ.get("TRIAGE_REQUIRE_DICOM3TOOLS"):
            pytest.fail("dciodvfy (dicom3tools) is required here (TRIAGE_REQUIRE_DICOM3TOOLS is set)")
        pytest.skip("dciodvfy not installed: apt-get install dicom3tools")
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    done = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def test_the_segmentation_lies_on_the_tilted_source_slices_and_passes_dciodvfy(tmp_path: Path) -> None:
    series = head_ct()
    finding, masks = bleed(series)
    seg = build_segmentation(series, masks, finding, finding_code(finding, CODES))
    assert dciodvfy_errors(seg, tmp_path) == []
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    back = hd.seg.segread(tmp_path / "seg.dcm")
    assert back.StudyInstanceUID == series[0].StudyInstanceUID
    assert back.FrameOfReferenceUID == series[0].FrameOfReferenceUID
    (segment,) = back.SegmentSequence
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "1386000"
    assert segment.SegmentAlgorithmName == "ct-head-ich"
    # One frame per masked source slice, each referencing its slice and placed where that slice is (the gantry
    # tilt and the uneven spacing come from the slices themselves).
    by_uid = {str(ds.SOPInstanceUID): ds for ds in series}
    assert int(back.NumberOfFrames) == 4
    for frame in back.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert source in masks.sop_instance_uids
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx([float(v) for v in by_uid[source].ImagePositionPatient])
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=masks.sop_instance_uids, segment_numbers=[1]
    )  # (frames, rows, cols, segments)
    assert np.array_equal(pixels[..., 0].astype(bool), masks.masks)


def test_the_measurement_report_follows_tid_1500_and_passes_dciodvfy(tmp_path: Path) -> None:
    series = head_ct()
    finding, masks = bleed(series, synthetic=True)
    seg = build_segmentation(series, masks, finding, finding_code(finding, CODES))
    report = build_measurement_report([series[0], seg], [finding], CODES, segmentations={0: seg})
    assert dciodvfy_errors(report, tmp_path) == []
    report.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    back = hd.sr.srread(tmp_path / "sr.dcm")
    assert back.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert back.StudyInstanceUID == series[0].StudyInstanceUID
    assert back.VerificationFlag == "UNVERIFIED" and back.CompletionFlag == "COMPLETE"
    (group,) = back.content.get_volumetric_roi_measurement_groups()
    assert group.finding_type.value == "1386000" and group.finding_type.scheme_designator == "SCT"
    assert [(q.name.meaning, q.value.meaning) for q in group.get_qualitative_evaluations()] == [("Presence", "Present")]
    measured = {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}
    assert measured["AI probability of the finding"] == (pytest.approx(0.97), "1")
    assert measured["Volume"] == (pytest.approx(8.1), "ml")
    assert measured["volume of IPH component"] == (pytest.approx(8.0), "ml")
    # Algorithm Name (DCM 111001) and Version (111003): the model and version, for the group and each measurement.
    assert set(texts(group[0], "111001")) == {"ct-head-ich"} and set(texts(group[0], "111003")) == {"1.0.0"}
    referenced = group.referenced_segment
    assert referenced.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert referenced.referenced_segment_numbers == [1]
    assert str(referenced.source_series_for_segmentation.value) == str(series[0].SeriesInstanceUID)
    notes = [
        i.TextValue
        for i in back.ContentSequence
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "121106"
    ]  # noqa: E501
    assert NOT_FOR_DIAGNOSIS in notes and any(SYNTHETIC_NOTICE in n for n in notes)
    assert "synthetic" in back.SeriesDescription


def test_a_radiograph_finding_is_located_on_its_image_and_one_without_location_by_its_centroid(tmp_path) -> None:
    film = make_radiograph("DX", 128, 128)
    mask = np.zeros((16, 16), dtype=np.float32)
    mask[2:4, 10:12] = 1.0  # stride 8: rows 16..31, columns 80..95
    overlay = Overlay(str(film.SOPInstanceUID), mask, 8)
    ptx = Finding(label="pneumothorax", probability=0.93, flagged=True, model="xr-chest-pneumothorax",
                  model_version="1.0.0", synthetic=True, series_uid=str(film.SeriesInstanceUID))  # fmt: skip
    report = build_measurement_report([film], [ptx], CODES, overlays={0: overlay})
    assert dciodvfy_errors(report, tmp_path) == []
    report.save_as(tmp_path / "xr.dcm", enforce_file_format=True)
    (group,) = hd.sr.srread(tmp_path / "xr.dcm").content.get_planar_roi_measurement_groups()
    assert group.finding_type.meaning == "Pneumothorax"
    region = group.roi
    assert region.value_type == hd.sr.ValueTypeValues.SCOORD
    assert region.value.tolist() == [[88.0, 24.0]]  # (column, row): the centre of pixels 80..95 and 16..31
    (image,) = region.ContentSequence  # the SCOORD is selected from the radiograph (IMAGE, SELECTED FROM)
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == film.SOPInstanceUID
    series = head_ct()
    finding, _ = bleed(series)
    without = build_measurement_report([series[0]], [finding], CODES)
    without.save_as(tmp_path / "centroid.dcm", enforce_file_format=True)
    (plain,) = hd.sr.srread(tmp_path / "centroid.dcm").content.get_image_measurement_groups()
    volume = next(m for m in plain.get_measurements() if m.name.meaning == "Volume")
    (point,) = volume.referenced_coordinates
    assert point.value.tolist() == [[10.5, -20.0, 35.25]]
    assert point.ReferencedFrameOfReferenceUID == series[0].FrameOfReferenceUID


def test_a_study_exports_its_report_seg_and_capture_from_the_store(tmp_path: Path) -> None:
    series = head_ct()
    store = LocalStore(tmp_path / "store", tmp_path / "overlays")
    for ds in series:
        write_dataset(ds, tmp_path / "store" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm")
    finding, masks = bleed(series)
    study_uid = str(series[0].StudyInstanceUID)
    store.put_overlay(study_uid, "ich-seg.npz", segmentation_bytes(masks))
    key = masks.sop_instance_uids[1]
    store.put_overlay(study_uid, "ich.npz", overlay_bytes(Overlay(key, masks.masks[1][::4, ::4].astype(np.float32), 4)))
    finding = finding.model_copy(update={"segmentation_file": "ich-seg.npz", "overlay_file": "ich.npz"})
    shadow = finding.model_copy(update={"segmentation_file": "missing.npz", "overlay_file": None, "label": "x"})
    datasets = build_study_results(store, study_uid, [finding, shadow], CODES)
    classes = [str(ds.SOPClassUID) for ds in datasets]
    assert classes == [pydicom.uid.Comprehensive3DSRStorage, pydicom.uid.SegmentationStorage,
                       pydicom.uid.SecondaryCaptureImageStorage]  # fmt: skip
    report, seg, _capture = datasets
    assert {ds.StudyInstanceUID for ds in datasets} == {study_uid}
    evidence = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for study in report.CurrentRequestedProcedureEvidenceSequence
        for series_item in study.ReferencedSeriesSequence
        for item in [series_item]
    }
    assert evidence  # the report lists what it rests on
    for ds in datasets:
        assert dciodvfy_errors(ds, tmp_path) == [], ds.SOPClassUID
