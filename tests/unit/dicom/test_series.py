"""Reading series: routing attributes, grouping instances, and CT slice stacks sorted by geometry in HU."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

from triage.dicom.series import AIR_HU, group_series, read_ct_stack, read_series_attributes
from triage.domain import InstanceMeta
from triage.errors import InvalidStudyError

REAL_HEAD_CT = [
    Path(__file__).resolve().parents[2] / "data" / "ct-head-ge",
    Path("/work/shared/data/ct-head-ge"),
]


def real_head_ct_files() -> list[Path]:
    for folder in REAL_HEAD_CT:
        files = sorted(folder.glob("*.dcm"))
        if files:
            return files
    pytest.skip(f"the GE head CT is in neither {[str(p) for p in REAL_HEAD_CT]}")


# ----------------------------------------------------------------------------------------------- synthetic CT
# These slices are written here rather than with tests/dicom_factory.py because the cases need control the
# factory does not offer: per-slice (variable) tilt, any Rescale Slope/Intercept, signed pixels with padding.


def tilted_cosines(tilt_deg: float) -> tuple[list[float], list[float]]:
    """Row and column cosines of an axial slice whose plane is tilted by `tilt_deg` about the x axis."""
    t = math.radians(tilt_deg)
    return [1.0, 0.0, 0.0], [0.0, math.cos(t), -math.sin(t)]


def head_hu(points: np.ndarray) -> np.ndarray:
    """A crude head in LPS mm: skull shell (1000 HU) around brain (35 HU), air (-1000) outside."""
    r = np.sqrt((points[..., 0] / 70.0) ** 2 + (points[..., 1] / 85.0) ** 2 + (points[..., 2] / 80.0) ** 2)
    hu = np.full(points.shape[:-1], -1000.0)
    hu[r <= 1.0] = 1000.0
    hu[r <= 0.92] = 35.0
    return hu


def make_slice(
    z_mm: float,
    *,
    tilt_deg: float = 0.0,
    rows: int = 32,
    cols: int = 32,
    spacing: Sequence[float] = (6.0, 6.0),
    slope: float = 1.0,
    intercept: float = -1024.0,
    instance_number: int = 1,
    series_uid: str = "1.2.3.4",
    hu: np.ndarray | None = None,
    signed: bool = False,
    padding_value: int | None = None,
) -> Dataset:
    """One CT Image Storage slice whose centre lies at (0, 0, z_mm), the table having moved along z."""
    row_cos, col_cos = tilted_cosines(tilt_deg)
    rc, cc = np.asarray(row_cos), np.asarray(col_cos)
    position = np.array([0.0, 0.0, z_mm]) - (cols - 1) / 2 * spacing[1] * rc - (rows - 1) / 2 * spacing[0] * cc
    if hu is None:
        i = np.arange(rows)[:, None, None]
        j = np.arange(cols)[None, :, None]
        hu = head_hu(position + j * spacing[1] * rc + i * spacing[0] * cc)
    stored = np.rint((hu - intercept) / slope)
    ds = Dataset()
    uid = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid
    ds.Modality = "CT"
    ds.PatientName = "SYNTHETIC^HEAD"
    ds.PatientID = "SYN-0001"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.7f}" for v in row_cos + col_cos]
    ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
    ds.SliceThickness = "5"
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    if padding_value is not None:
        ds.PixelPaddingValue = padding_value
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    return ds


def write(datasets: Sequence[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(datasets):
        path = folder / f"slice{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def plain_stack(zs: Sequence[float], **kwargs) -> list[Dataset]:
    return [make_slice(z, instance_number=k + 1, **kwargs) for k, z in enumerate(zs)]


# ------------------------------------------------------------------------------------------ read_ct_stack


def test_slices_are_sorted_by_position_not_by_instance_number_or_file_order(tmp_path: Path) -> None:
    zs = [-20.0, -15.0, -10.0, -5.0, 0.0, 5.0, 10.0, 15.0]
    numbers = [5, 2, 8, 1, 7, 3, 6, 4]  # deliberately unrelated to position
    datasets = [make_slice(z, instance_number=n) for z, n in zip(zs, numbers, strict=True)]
    uids_by_z = [str(ds.SOPInstanceUID) for ds in datasets]
    shuffled = write(datasets, tmp_path)
    random.Random(7).shuffle(shuffled)

    stack = read_ct_stack(shuffled)

    centres = stack.positions_lps + 15.5 * 6.0 * (stack.row_cosines + stack.col_cosines)
    assert np.allclose(centres[:, 2], zs, atol=1e-3)
    assert stack.sop_instance_uids == uids_by_z
    assert stack.instance_numbers == numbers
    assert stack.pixels_hu.shape == (8, 32, 32) and stack.pixels_hu.dtype == np.float32
    assert stack.pixel_spacing_mm == (6.0, 6.0)
    assert stack.slice_thickness_mm == [5.0] * 8
    assert stack.frame_numbers == [1] * 8


def test_sorting_follows_the_normal_whatever_the_plane(tmp_path: Path) -> None:
    # Coronal slices: row (1, 0, 0) x column (0, 0, -1) gives the normal (0, 1, 0), so ascending along the
    # normal means ascending y, here the reverse of the instance numbering.
    datasets = plain_stack([0.0, 10.0, 20.0])
    for ds in datasets:
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
        ds.ImagePositionPatient = ["-93", f"{ds.InstanceNumber * -4.0:g}", "93"]
    stack = read_ct_stack(write(datasets, tmp_path))
    assert np.allclose(stack.normals, [0.0, 1.0, 0.0])
    assert np.allclose(stack.positions_lps[:, 1], [-12.0, -8.0, -4.0])
    assert stack.instance_numbers == [3, 2, 1]


def test_rescale_slope_and_intercept_give_hounsfield_units(tmp_path: Path) -> None:
    hu = np.full((32, 32), 40.0)
    hu[0, 0], hu[0, 1], hu[1, 0] = -1000.0, 1500.0, -20.0
    datasets = [
        make_slice(z, hu=hu, slope=0.5, intercept=-1000.0, instance_number=k + 1) for k, z in enumerate([0, 5, 10])
    ]
    stack = read_ct_stack(write(datasets, tmp_path))
    assert stack.pixels_hu[1, 0, 0] == pytest.approx(-1000.0)
    assert stack.pixels_hu[1, 0, 1] == pytest.approx(1500.0)
    assert stack.pixels_hu[1, 1, 0] == pytest.approx(-20.0)
    assert stack.pixels_hu[1, 5, 5] == pytest.approx(40.0)


def test_pixel_padding_and_values_below_air_become_air(tmp_path: Path) -> None:
    hu = np.full((32, 32), 30.0)
    hu[:, :4] = -1500.0  # stored -1500 with intercept 0: the declared Pixel Padding Value
    hu[:, 4:6] = -3024.0  # outside the reconstruction circle, undeclared
    datasets = [
        make_slice(z, hu=hu, intercept=0.0, signed=True, padding_value=-1500, instance_number=k + 1)
        for k, z in enumerate([0, 5])
    ]
    stack = read_ct_stack(write(datasets, tmp_path))
    assert np.all(stack.pixels_hu[:, :, :6] == AIR_HU)
    assert np.all(stack.pixels_hu[:, :, 6:] == pytest.approx(30.0))


def test_pixel_padding_range_limit_marks_a_range_as_air(tmp_path: Path) -> None:
    hu = np.full((32, 32), 30.0)
    hu[:, 0] = 3000.0  # padding declared as the range 2990..3010 of stored values
    hu[:, 1] = 3005.0
    datasets = [make_slice(z, hu=hu, intercept=0.0, signed=True, instance_number=k + 1) for k, z in enumerate([0, 5])]
    for ds in datasets:
        ds.PixelPaddingValue = 2990
        ds.PixelPaddingRangeLimit = 3010
    stack = read_ct_stack(write(datasets, tmp_path))
    assert np.all(stack.pixels_hu[:, :, :2] == AIR_HU)
    assert np.all(stack.pixels_hu[:, :, 2:] == pytest.approx(30.0))


def test_a_gantry_tilted_stack_is_sorted_along_its_tilted_normal(tmp_path: Path) -> None:
    zs = [12.0, 0.0, 6.0, 18.0]
    datasets = [make_slice(z, tilt_deg=20.0, instance_number=k + 1) for k, z in enumerate(zs)]
    stack = read_ct_stack(write(datasets, tmp_path))
    assert stack.instance_numbers == [2, 3, 1, 4]
    normal = stack.normals[0]
    assert normal @ [0, 0, 1] == pytest.approx(math.cos(math.radians(20.0)))
    # The table moved along z, so positions step 6 mm in z but only 6 cos(20 deg) along the normal.
    assert np.allclose(np.diff(stack.positions_lps @ normal), 6.0 * math.cos(math.radians(20.0)), atol=1e-3)


def test_a_variably_tilted_stack_is_accepted_with_each_slice_orientation(tmp_path: Path) -> None:
    tilts = [0.0, 4.0, 8.0, 12.0, 16.0]
    datasets = [make_slice(6.0 * k, tilt_deg=t, instance_number=k + 1) for k, t in enumerate(tilts)]
    stack = read_ct_stack(write(datasets, tmp_path))
    assert stack.instance_numbers == [1, 2, 3, 4, 5]
    angles = np.degrees(np.arccos(np.clip(stack.normals @ [0.0, 0.0, 1.0], -1, 1)))
    assert np.allclose(angles, tilts, atol=1e-3)


def test_enhanced_ct_frames_are_read_from_functional_groups_and_sorted(tmp_path: Path) -> None:
    rows = cols = 16
    spacing = 8.0
    zs = [10.0, -10.0, 0.0, 20.0]  # frames stored out of order
    row_cos, col_cos = tilted_cosines(0.0)
    ds = Dataset()
    uid = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = uid
    ds.Modality = "CT"
    ds.InstanceNumber = 9
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(zs)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [f"{spacing:g}", f"{spacing:g}"]
    measures.SliceThickness = "10"
    orientation = Dataset()
    orientation.ImageOrientationPatient = [f"{v:g}" for v in row_cos + col_cos]
    transform = Dataset()
    transform.RescaleSlope = "2"
    transform.RescaleIntercept = "-1000"
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame, frames = [], []
    for z in zs:
        plane = Dataset()
        plane.ImagePositionPatient = [f"{-(cols - 1) / 2 * spacing:g}", f"{-(rows - 1) / 2 * spacing:g}", f"{z:g}"]
        item = Dataset()
        item.PlanePositionSequence = DicomSequence([plane])
        per_frame.append(item)
        frames.append(np.full((rows, cols), (z + 1000.0) / 2, dtype=np.uint16))  # HU = z
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.stack(frames).tobytes()
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)

    stack = read_ct_stack([path])

    assert stack.frame_numbers == [2, 3, 1, 4]
    assert np.allclose(stack.positions_lps[:, 2], sorted(zs))
    assert np.allclose(stack.pixels_hu.mean(axis=(1, 2)), sorted(zs))  # slope 2, intercept -1000 applied
    assert stack.sop_instance_uids == [uid] * 4
    assert stack.instance_numbers == [9] * 4
    assert stack.slice_thickness_mm == [10.0] * 4
    attributes = read_series_attributes(path)
    assert attributes["NumberOfFrames"] == 4
    assert attributes["ImageOrientationPatient"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert attributes["SliceThickness"] == 10.0


def test_real_enhanced_ct_from_pydicom_data_reads_both_frames() -> None:
    from pydicom.data import get_testdata_file

    # Only a local copy (from the pydicom-data package): never a download during tests.
    path = get_testdata_file("eCT_Supplemental.dcm", download=False)
    if path is None:
        pytest.skip("eCT_Supplemental.dcm is not installed (pip install pydicom-data)")
    stack = read_ct_stack([path])
    assert stack.pixels_hu.shape == (2, 512, 512)
    # Orientation [-1, 0, 0, 0, 1, 0]: the normal is (0, 0, -1), so the frame nearer the feet comes last.
    assert np.allclose(stack.normals, [0.0, 0.0, -1.0])
    assert np.all(np.diff(stack.positions_lps[:, 2]) < 0)
    assert stack.frame_numbers == [2, 1]
    assert stack.pixels_hu.min() >= AIR_HU


# ------------------------------------------------------------------------------ read_ct_stack: bad series


def test_one_slice_is_not_a_volume_and_the_count_is_quoted(tmp_path: Path) -> None:
    with pytest.raises(InvalidStudyError, match=r"at least 2 slices; got 1 slice"):
        read_ct_stack(write(plain_stack([0.0]), tmp_path))


def test_no_files_is_not_a_volume() -> None:
    with pytest.raises(InvalidStudyError, match=r"got 0 slice"):
        read_ct_stack([])


def test_missing_pixel_data_is_named(tmp_path: Path) -> None:
    datasets = plain_stack([0.0, 5.0])
    del datasets[1].PixelData
    with pytest.raises(InvalidStudyError, match=r"no Pixel Data"):
        read_ct_stack(write(datasets, tmp_path))


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_missing_geometry_is_named(tmp_path: Path, keyword: str) -> None:
    datasets = plain_stack([0.0, 5.0, 10.0])
    delattr(datasets[2], keyword)
    with pytest.raises(InvalidStudyError, match=rf"slice002\.dcm.*no {keyword}"):
        read_ct_stack(write(datasets, tmp_path))


def test_malformed_orientation_is_quoted(tmp_path: Path) -> None:
    datasets = plain_stack([0.0, 5.0])
    datasets[0].ImageOrientationPatient = ["1", "0", "0", "1", "0", "0"]
    with pytest.raises(InvalidStudyError, match=r"\[1\.0, 0\.0, 0\.0, 1\.0, 0\.0, 0\.0\] is not two orthogonal"):
        read_ct_stack(write(datasets, tmp_path))


def test_inconsistent_rows_and_columns_are_quoted(tmp_path: Path) -> None:
    datasets = plain_stack([0.0, 5.0])
    datasets[1] = make_slice(5.0, rows=24, cols=32, instance_number=2)
    with pytest.raises(InvalidStudyError, match=r"differ in size.*32x32.*24x32"):
        read_ct_stack(write(datasets, tmp_path))


def test_inconsistent_pixel_spacing_is_quoted(tmp_path: Path) -> None:
    datasets = [make_slice(0.0), make_slice(5.0, spacing=(6.5, 6.5), instance_number=2)]
    with pytest.raises(InvalidStudyError, match=r"Pixel Spacing.*\[6\.0, 6\.0\].*\[6\.5, 6\.5\]"):
        read_ct_stack(write(datasets, tmp_path))


def test_duplicate_positions_are_refused(tmp_path: Path) -> None:
    datasets = plain_stack([0.0, 5.0, 5.0, 10.0])
    with pytest.raises(InvalidStudyError, match=r"same position.*duplicate"):
        read_ct_stack(write(datasets, tmp_path))


def test_a_plane_beyond_gantry_tilt_is_refused(tmp_path: Path) -> None:
    datasets = plain_stack([0.0, 5.0, 10.0])
    datasets[1].ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]  # a sagittal slice in an axial series
    with pytest.raises(InvalidStudyError, match=r"slice normal.*differs by 90\.0 degrees.*at most 30"):
        read_ct_stack(write(datasets, tmp_path))


def test_a_file_that_is_not_dicom_is_named(tmp_path: Path) -> None:
    paths = write(plain_stack([0.0, 5.0]), tmp_path)
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not an image")
    with pytest.raises(InvalidStudyError, match=r"notes\.txt"):
        read_ct_stack([*paths, bogus])


def test_errors_never_quote_patient_identifiers(tmp_path: Path) -> None:
    datasets = plain_stack([0.0, 5.0, 5.0])
    with pytest.raises(InvalidStudyError) as info:
        read_ct_stack(write(datasets, tmp_path))
    assert "SYNTHETIC" not in str(info.value) and "SYN-0001" not in str(info.value)


# --------------------------------------------------------------------------------- read_series_attributes


def test_series_attributes_are_plain_python_values(tmp_path: Path) -> None:
    ds = make_slice(0.0, tilt_deg=10.0)
    ds.BodyPartExamined = "HEAD"
    ds.StudyDescription = "CT HEAD"
    ds.SeriesDescription = "Axial 5mm"
    ds.ProtocolName = "Routine head"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ConvolutionKernel = ["FC21", "AIDR"]
    ds.SliceThickness = "5.0"
    path = write([ds], tmp_path)[0]

    attributes = read_series_attributes(path)

    assert attributes["Modality"] == "CT"
    assert attributes["SOPClassUID"] == CTImageStorage
    assert attributes["BodyPartExamined"] == "HEAD"
    assert attributes["StudyDescription"] == "CT HEAD"
    assert attributes["SeriesDescription"] == "Axial 5mm"
    assert attributes["ProtocolName"] == "Routine head"
    assert attributes["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert attributes["ConvolutionKernel"] == "FC21\\AIDR"
    assert attributes["SliceThickness"] == 5.0
    assert attributes["ImageOrientationPatient"] == pytest.approx(
        [1, 0, 0, 0, math.cos(math.radians(10)), -math.sin(math.radians(10))], abs=1e-6
    )
    assert attributes["Rows"] == 32 and attributes["Columns"] == 32
    assert attributes["PhotometricInterpretation"] == "MONOCHROME2"
    assert attributes["NumberOfFrames"] == 1
    assert attributes["ViewPosition"] is None
    assert attributes["PatientOrientation"] == []
    # Plain types only, so the dict can be stored as JSON and compared without pydicom.
    for key, value in attributes.items():
        assert type(value) in (str, float, int, list, type(None)), key
        if isinstance(value, list):
            assert all(type(v) in (str, float) for v in value), key
    assert "SYNTHETIC^HEAD" not in repr(attributes) and "SYN-0001" not in repr(attributes)


def test_series_attributes_of_a_non_dicom_file_name_it(tmp_path: Path) -> None:
    path = tmp_path / "broken.dcm"
    path.write_bytes(b"\x00" * 10)
    with pytest.raises(InvalidStudyError, match=r"broken\.dcm"):
        read_series_attributes(path)


# ---------------------------------------------------------------------------------------------- group_series


def _meta(ds: Dataset, path: Path) -> InstanceMeta:
    return InstanceMeta(
        study_uid="1.2.3",
        series_uid=str(ds.SeriesInstanceUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        modality=str(ds.Modality),
        key=str(path),
    )


def test_group_series_groups_in_first_seen_order_and_counts_resent_instances_once(tmp_path: Path) -> None:
    a = [make_slice(5.0 * k, series_uid="1.2.3.10", instance_number=k + 1) for k in range(3)]
    b = [make_slice(5.0 * k, series_uid="1.2.3.20", instance_number=k + 1) for k in range(2)]
    for ds in b:
        ds.SeriesDescription = "bone"
    a_paths = write(a, tmp_path / "a")
    b_paths = write(b, tmp_path / "b")
    metas = [
        _meta(b[0], b_paths[0]),
        _meta(a[0], a_paths[0]),
        _meta(a[1], a_paths[1]),
        _meta(b[1], b_paths[1]),
        _meta(a[1], a_paths[1]),  # re-sent
        _meta(a[2], a_paths[2]),
    ]
    series = group_series(metas)
    assert [s.series_uid for s in series] == ["1.2.3.20", "1.2.3.10"]
    assert [s.n_instances for s in series] == [2, 3]
    assert series[1].files == tuple(str(p) for p in a_paths)
    assert series[0].modality == "CT" and series[0].sop_class_uid == CTImageStorage
    assert series[0].attributes["SeriesDescription"] == "bone"
    assert series[1].attributes["SeriesDescription"] is None


def test_group_series_reads_attributes_from_the_first_readable_file(tmp_path: Path) -> None:
    ds = make_slice(0.0)
    good = write([ds], tmp_path)[0]
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"junk")
    metas = [
        InstanceMeta("1.2.3", "1.2.3.4", "9.9", CTImageStorage, "CT", str(broken)),
        _meta(ds, good),
    ]
    (series,) = group_series(metas)
    assert series.attributes["Modality"] == "CT"
    assert series.n_instances == 2


def test_group_series_with_no_readable_file_says_so(tmp_path: Path) -> None:
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"junk")
    with pytest.raises(InvalidStudyError, match=r"none of its 1 files"):
        group_series([InstanceMeta("1.2.3", "1.2.3.4", "9.9", CTImageStorage, "CT", str(broken))])


# ------------------------------------------------------------------------------------------- real head CT


def test_real_head_ct_is_sorted_by_position_with_its_uneven_spacing() -> None:
    files = real_head_ct_files()
    shuffled = list(files)
    random.Random(3).shuffle(shuffled)
    stack = read_ct_stack(shuffled)

    assert stack.pixels_hu.shape == (28, 512, 512)
    assert stack.instance_numbers == list(range(1, 29))  # here position order agrees with the numbering
    gaps = np.diff(stack.positions_lps @ stack.normals[0])
    assert np.all(gaps > 0)
    assert gaps.min() == pytest.approx(1.08, abs=0.01) and gaps.max() == pytest.approx(7.0, abs=0.01)
    assert sorted(set(stack.slice_thickness_mm)) == [4.0, 7.0]
    # Gantry tilt: positions move along z (the table), not along the tilted normal.
    assert math.degrees(math.acos(stack.normals[0] @ [0, 0, 1])) == pytest.approx(18.5, abs=0.05)
    assert np.allclose(stack.positions_lps[:, :2], stack.positions_lps[0, :2])
    # HU: padding (-1500 stored) is air; bone reaches well above 1000 HU.
    assert stack.pixels_hu.min() == AIR_HU
    assert stack.pixels_hu.max() > 1000.0
    assert stack.sop_instance_uids[0] == str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
