"""Read series: the attributes routing looks at, grouping instances into series, and CT slice stacks in HU."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from triage.dicom.store import check_decode_limits
from triage.domain import SeriesInfo
from triage.errors import InvalidStudyError, NotFoundError
from triage.storage import InstanceSource, PathSource, key_name

log = logging.getLogger(__name__)

# Air. Pixels outside the reconstructed field (Pixel Padding Value, or the -2000 / -3024 that some scanners
# store there without declaring padding) become air, so that interpolation at the edge of the field of view
# does not smear impossible values into the head.
AIR_HU = -1024.0

# Clinical CT gantries tilt by at most about +-30 degrees; slices of one series whose normals (or row
# directions) differ by more than this are not one tilted stack but a mix (for example an axial series with a
# localizer in it).
MAX_ORIENTATION_DIFFERENCE_DEG = 30.0

# Two slices closer than this along the slice normal are the same slice sent twice (or two overlapping series).
DUPLICATE_POSITION_TOLERANCE_MM = 0.01

# Image Orientation (Patient) direction cosines must be unit vectors and orthogonal to within this.
_COSINE_TOLERANCE = 1e-2

# The attributes routing rules may look at, read from the top level of the dataset or, for enhanced
# (multi-frame) objects, from the shared or first per-frame functional group (PS3.3 C.7.6.16).
_STRING_ATTRIBUTES = (
    "Modality",
    "SOPClassUID",
    "BodyPartExamined",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "ConvolutionKernel",
    "ViewPosition",
    "PhotometricInterpretation",
    "InstitutionName",
)
_LIST_STRING_ATTRIBUTES = ("ImageType", "PatientOrientation")
# Functional group sequences (and the attribute in them) that carry an attribute in enhanced objects.
_FUNCTIONAL_GROUP_HOMES: dict[str, tuple[str, ...]] = {
    "ImageOrientationPatient": ("PlaneOrientationSequence",),
    "ImagePositionPatient": ("PlanePositionSequence",),
    "PixelSpacing": ("PixelMeasuresSequence",),
    "SliceThickness": ("PixelMeasuresSequence",),
    "RescaleSlope": ("PixelValueTransformationSequence",),
    "RescaleIntercept": ("PixelValueTransformationSequence",),
    "ConvolutionKernel": ("CTReconstructionSequence",),
}


def _plain_str(value: Any) -> str:
    """A DICOM string value as plain `str`; multi-valued strings are joined with a backslash as stored."""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def _from_functional_groups(ds: Dataset, keyword: str, frame: int | None = None) -> Any:
    """An attribute from the per-frame functional group of `frame` (0-based), else the shared one, else None."""
    homes = _FUNCTIONAL_GROUP_HOMES.get(keyword, ())
    groups: list[Dataset] = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame:
        groups.append(per_frame[frame if frame is not None and frame < len(per_frame) else 0])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        for home in homes:
            seq = group.get(home)
            if seq and keyword in seq[0]:
                return seq[0].get(keyword)
    return None


def _lookup(ds: Dataset, keyword: str, frame: int | None = None) -> Any:
    """An attribute's raw value: per-frame functional group (it overrides), shared functional group, top level."""
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        value = _from_functional_groups(ds, keyword, frame)
        if value is not None:
            return value
    value = ds.get(keyword)
    return value if value not in (None, "") else None


def _dcmread(source: InstanceSource | None, key: str | Path, **kwargs: Any) -> Dataset:
    """Read one instance by key from `source` (by path when None).

    Raises:
        InvalidStudyError: when it is not stored or not DICOM.
    """
    reader = source if source is not None else PathSource()
    try:
        with reader.open(str(key)) as handle:
            return pydicom.dcmread(handle, **kwargs)
    except NotFoundError as exc:
        raise InvalidStudyError(f"cannot read {key_name(str(key))!r}: {exc}") from exc
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise InvalidStudyError(f"cannot read {key_name(str(key))!r} as DICOM: {exc}") from exc


def read_series_attributes(path: str | Path, source: InstanceSource | None = None) -> dict[str, Any]:
    """Read, without pixel data, the attributes that routing rules look at.

    Values are plain Python: `str` for text (a multi-valued Convolution Kernel is joined with a backslash),
    `list[str]` for ImageType and PatientOrientation, `float` for SliceThickness, `list[float]` for
    ImageOrientationPatient, `int` for Rows, Columns and NumberOfFrames (1 when the object is single-frame).
    An absent attribute is `None` (an empty list for the list attributes). No patient identifiers are read out.

    Args:
        path: the key of one instance of the series in `source` (a file path when `source` is None).
        source: where instances are read from (the store, or fetched bytes).

    Raises:
        InvalidStudyError: when the instance is missing or not DICOM.
    """
    ds = _dcmread(source, path, stop_before_pixels=True)

    attributes: dict[str, Any] = {}
    for keyword in _STRING_ATTRIBUTES:
        value = _lookup(ds, keyword)
        attributes[keyword] = None if value is None else _plain_str(value)
    for keyword in _LIST_STRING_ATTRIBUTES:
        value = _lookup(ds, keyword)
        if value is None:
            attributes[keyword] = []
        elif isinstance(value, str):
            attributes[keyword] = [value]
        else:
            attributes[keyword] = [str(v) for v in value]
    thickness = _lookup(ds, "SliceThickness")
    attributes["SliceThickness"] = _to_float(thickness)
    orientation = _lookup(ds, "ImageOrientationPatient")
    attributes["ImageOrientationPatient"] = None if orientation is None else [float(v) for v in orientation]
    for keyword in ("Rows", "Columns"):
        value = ds.get(keyword)
        attributes[keyword] = None if value is None else int(value)
    frames = ds.get("NumberOfFrames")
    attributes["NumberOfFrames"] = int(frames) if frames not in (None, "") else 1
    # For intended-use checks: the age in years (the birth date is read for it and not kept) and the pixel
    # spacing in mm (Pixel Spacing, else Imager Pixel Spacing of a projection radiograph; the finer of the two).
    years, age_from = patient_age_years(ds.get("PatientAge"), ds.get("PatientBirthDate"), ds.get("StudyDate"))
    attributes["PatientAgeYears"] = None if years is None else round(years, 2)
    attributes["PatientAgeSource"] = age_from
    spacing = _lookup(ds, "PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        attributes["PixelSpacingMm"] = min(float(v) for v in spacing) if spacing else None
    except (TypeError, ValueError):
        attributes["PixelSpacingMm"] = None
    for keyword in ("Manufacturer", "ManufacturerModelName"):
        value = ds.get(keyword)
        attributes[keyword] = None if value in (None, "") else _plain_str(value)
    return attributes


def patient_age_years(patient_age: Any, birth_date: Any = None, study_date: Any = None) -> tuple[float | None, str]:
    """The patient's age in years, from Patient's Age (AS, "045Y", "006M", "010W", "003D") or else from the birth
    date and the study date, and which one it came from ("" when neither gives one).

    The birth date is used here only and never kept.
    """
    text = str(patient_age or "").strip().upper()
    match = re.fullmatch(r"(\d{1,3})\s*([DWMY]?)", text)
    if match:
        value, unit = int(match.group(1)), match.group(2) or "Y"
        per_year = {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[unit]
        return value / per_year, "Patient's Age"
    born, seen = _da(birth_date), _da(study_date)
    if born is not None and seen is not None and seen >= born:
        return (seen - born).days / 365.25, "birth date and study date"
    return None, ""


def _da(value: Any) -> date | None:
    text = str(value or "").strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _to_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def with_routing_attributes(series: SeriesInfo, source: InstanceSource | None = None) -> SeriesInfo:
    """The series with the attributes routing rules look at, read from the first of its instances that can be
    read, over what was indexed when its instances arrived. This is how every analysed series gets its attributes.

    Args:
        series: the series, its `files` being instance keys in `source` (file paths when `source` is None).
        source: where instances are read from (the store, or fetched bytes).

    Raises:
        InvalidStudyError: when no file of the series can be read as DICOM.
    """
    if not series.files:
        return series
    attributes = {**series.attributes, **_first_readable_attributes(series.series_uid, series.files, source)}
    return replace(series, attributes=attributes)


def _first_readable_attributes(series_uid: str, files: Sequence[str], source: InstanceSource | None) -> dict[str, Any]:
    errors: list[str] = []
    for path in files:
        try:
            return read_series_attributes(path, source)
        except InvalidStudyError as exc:
            errors.append(str(exc))
            log.warning("series %s: skipping unreadable file for routing attributes: %s", series_uid, exc)
    raise InvalidStudyError(f"series {series_uid}: none of its {len(files)} files can be read: {errors[:3]}")


@dataclass
class SliceStack:
    """The slices of one CT series sorted along the slice normal, in Hounsfield units.

    Row and column follow DICOM: the row cosine is the direction along a row (increasing column index), the
    column cosine the direction down a column (increasing row index); both are LPS unit vectors per slice, so
    gantry tilt (and a tilt that varies between slices) is kept exactly as acquired.

    Attributes:
        pixels_hu: float32 (n, rows, cols) in HU (Rescale Slope/Intercept applied, padding set to air).
        positions_lps: float64 (n, 3) Image Position (Patient): the centre of each slice's first pixel, LPS mm.
        row_cosines: float64 (n, 3) LPS unit vectors along each slice's rows.
        col_cosines: float64 (n, 3) LPS unit vectors down each slice's columns.
        pixel_spacing_mm: (row_spacing, col_spacing): the distance between rows, then between columns, in mm.
        sop_instance_uids: the SOP Instance UID each slice came from (repeated for the frames of a multi-frame).
        instance_numbers: Instance Number of each slice's instance (0 when absent); never used for sorting.
        slice_thickness_mm: Slice Thickness of each slice in mm (NaN when absent).
        frame_numbers: 1-based frame number of each slice within its instance (1 for single-frame objects).
    """

    pixels_hu: np.ndarray
    positions_lps: np.ndarray
    row_cosines: np.ndarray
    col_cosines: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    sop_instance_uids: list[str]
    instance_numbers: list[int]
    slice_thickness_mm: list[float]
    frame_numbers: list[int] = field(default_factory=list)

    @property
    def n_slices(self) -> int:
        return int(self.pixels_hu.shape[0])

    @property
    def normals(self) -> np.ndarray:
        """float64 (n, 3) unit slice normals (row cosine x column cosine), LPS."""
        normals = np.cross(self.row_cosines, self.col_cosines)
        return normals / np.linalg.norm(normals, axis=1, keepdims=True)


@dataclass
class _Slice:
    """One frame as read, before sorting."""

    pixels: np.ndarray  # float32 (rows, cols) in HU
    position: np.ndarray  # (3,)
    row_cosine: np.ndarray  # (3,)
    col_cosine: np.ndarray  # (3,)
    pixel_spacing: tuple[float, float]
    sop_instance_uid: str
    instance_number: int
    thickness: float
    frame_number: int
    source: str  # file name, for error messages


def read_ct_stack(paths: Iterable[str | Path], source: InstanceSource | None = None) -> SliceStack:
    """Read CT slices (single-frame CT or Enhanced CT frames) and sort them along the slice normal.

    Slices are ordered by the projection of Image Position (Patient) on the stack's mean slice normal
    (row cosine x column cosine), never by Instance Number, which scanners and re-senders renumber freely.
    Stored values become HU with Rescale Slope/Intercept (from the Pixel Value Transformation functional group
    for Enhanced CT); Pixel Padding Value (and Pixel Padding Range Limit) pixels, and anything below -1024 HU,
    become -1024 HU (air).

    Args:
        paths: the instance keys of one series in `source`, in any order (file paths when `source` is None).
        source: where the instances are read from: the store, or their bytes fetched from it.

    Returns:
        The sorted stack (see `SliceStack`).

    Raises:
        InvalidStudyError: when there are fewer than 2 slices; a file is not DICOM or has no (decodable) pixel
            data; Image Position/Orientation (Patient) or Pixel Spacing is missing or malformed; rows, columns
            or pixel spacing differ between slices; two slices share a position; or slice normals (or row
            directions) differ by more than `MAX_ORIENTATION_DIFFERENCE_DEG`, more than any gantry tilt.
    """
    slices: list[_Slice] = []
    n_files = 0
    for path in paths:
        n_files += 1
        slices.extend(_read_slices(source, path))
    if len(slices) < 2:
        raise InvalidStudyError(
            f"a CT volume needs at least 2 slices; got {len(slices)} slice(s) from {n_files} file(s)"
        )
    _check_consistent_grid(slices)

    rows = np.stack([s.row_cosine for s in slices])
    cols = np.stack([s.col_cosine for s in slices])
    normals = np.cross(rows, cols)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    _check_orientations(slices, rows, normals)

    reference = normals.mean(axis=0)
    reference /= np.linalg.norm(reference)
    positions = np.stack([s.position for s in slices])
    along_normal = positions @ reference
    order = np.argsort(along_normal, kind="stable")
    _check_duplicates(slices, along_normal, order)

    ordered = [slices[i] for i in order]
    return SliceStack(
        pixels_hu=np.stack([s.pixels for s in ordered]).astype(np.float32, copy=False),
        positions_lps=positions[order],
        row_cosines=rows[order],
        col_cosines=cols[order],
        pixel_spacing_mm=ordered[0].pixel_spacing,
        sop_instance_uids=[s.sop_instance_uid for s in ordered],
        instance_numbers=[s.instance_number for s in ordered],
        slice_thickness_mm=[s.thickness for s in ordered],
        frame_numbers=[s.frame_number for s in ordered],
    )


def _read_slices(source: InstanceSource | None, key: str | Path) -> list[_Slice]:
    """All frames of one instance as slices in HU."""
    ds = _dcmread(source, key)
    path = Path(key_name(str(key)))  # for messages: the file name only
    if "PixelData" not in ds:
        raise InvalidStudyError(
            f"{path.name!r} (SOP class {ds.get('SOPClassUID', 'unknown')}) has no Pixel Data (7FE0,0010)"
        )
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples != 1:
        raise InvalidStudyError(f"{path.name!r} has Samples per Pixel {samples}; a CT slice has 1 (greyscale)")
    # The store refused instances beyond the site's limits; files read from elsewhere (`triage infer` on a
    # folder) meet the default limits here, before the decoder allocates what the header declares.
    check_decode_limits(ds)
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises several types for missing decoders and corrupt data
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown") if "file_meta" in ds else "unknown"
        raise InvalidStudyError(
            f"cannot decode the pixel data of {path.name!r} (transfer syntax {syntax}): {exc}"
        ) from exc

    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    if n_frames > 1 and not enhanced:
        raise InvalidStudyError(
            f"{path.name!r} has {n_frames} frames but no functional groups, so no geometry per frame "
            "(Image Position/Orientation (Patient) per frame is required)"
        )
    frames = stored.reshape(n_frames, *stored.shape[-2:]) if n_frames > 1 else stored[np.newaxis]
    padding = _padding_range(ds)
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    instance_number = _int_or_zero(ds.get("InstanceNumber"))

    out: list[_Slice] = []
    for index in range(n_frames):
        frame = index if enhanced else None
        position = _geometry(ds, "ImagePositionPatient", 3, path, frame)
        orientation = _geometry(ds, "ImageOrientationPatient", 6, path, frame)
        spacing = _geometry(ds, "PixelSpacing", 2, path, frame)
        row_cosine, col_cosine = _checked_cosines(orientation, path, index)
        if spacing[0] <= 0 or spacing[1] <= 0:
            raise InvalidStudyError(f"{path.name!r}: Pixel Spacing {spacing.tolist()} must be positive (mm)")
        slope = _to_float(_lookup(ds, "RescaleSlope", frame))
        intercept = _to_float(_lookup(ds, "RescaleIntercept", frame))
        thickness = _to_float(_lookup(ds, "SliceThickness", frame))
        out.append(
            _Slice(
                pixels=_to_hu(frames[index], 1.0 if slope is None else slope, intercept or 0.0, padding),
                position=position,
                row_cosine=row_cosine,
                col_cosine=col_cosine,
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
                sop_instance_uid=sop_uid,
                instance_number=instance_number,
                thickness=float("nan") if thickness is None else thickness,
                frame_number=index + 1,
                source=path.name if n_frames == 1 else f"{path.name} frame {index + 1}",
            )
        )
    return out


def _int_or_zero(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _geometry(ds: Dataset, keyword: str, length: int, path: Path, frame: int | None) -> np.ndarray:
    value = _lookup(ds, keyword, frame)
    where = path.name if frame is None else f"{path.name} frame {frame + 1}"
    if value is None:
        raise InvalidStudyError(f"{where!r} has no {keyword}; CT slices need it to be placed in the volume")
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidStudyError(f"{where!r}: {keyword} {value!r} is not numeric") from exc
    if array.shape != (length,) or not np.all(np.isfinite(array)):
        raise InvalidStudyError(f"{where!r}: {keyword} {array.tolist()} must be {length} finite numbers")
    return array


def _checked_cosines(orientation: np.ndarray, path: Path, index: int) -> tuple[np.ndarray, np.ndarray]:
    row, col = orientation[:3], orientation[3:]
    unit = abs(np.linalg.norm(row) - 1) < _COSINE_TOLERANCE and abs(np.linalg.norm(col) - 1) < _COSINE_TOLERANCE
    if not unit or abs(float(row @ col)) > _COSINE_TOLERANCE:
        raise InvalidStudyError(
            f"{path.name!r} frame {index + 1}: Image Orientation (Patient) {orientation.tolist()} is not two "
            "orthogonal unit vectors"
        )
    return row / np.linalg.norm(row), col / np.linalg.norm(col)


def _padding_range(ds: Dataset) -> tuple[float, float] | None:
    """Stored values that are padding (PS3.3 C.7.5.1.1.2), as an inclusive range, or None."""
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    bits = int(ds.get("BitsAllocated", 16))
    signed = int(ds.get("PixelRepresentation", 0)) == 1

    def as_stored(v: Any) -> float:
        # (0028,0120) is US or SS by Pixel Representation; a reader that guessed US turns -1500 into 64036.
        v = int(v)
        if signed and v >= 2 ** (bits - 1):
            v -= 2**bits
        return float(v)

    low = as_stored(value)
    high = low if limit is None else as_stored(limit)
    return (min(low, high), max(low, high))


def _to_hu(stored: np.ndarray, slope: float, intercept: float, padding: tuple[float, float] | None) -> np.ndarray:
    hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if padding is not None:
        hu[(stored >= padding[0]) & (stored <= padding[1])] = AIR_HU
    np.maximum(hu, np.float32(AIR_HU), out=hu)
    return hu


def _check_consistent_grid(slices: Sequence[_Slice]) -> None:
    first = slices[0]
    for s in slices[1:]:
        if s.pixels.shape != first.pixels.shape:
            raise InvalidStudyError(
                f"slices differ in size: {first.source!r} is {first.pixels.shape[0]}x{first.pixels.shape[1]} "
                f"(rows x columns) but {s.source!r} is {s.pixels.shape[0]}x{s.pixels.shape[1]}"
            )
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-3, atol=1e-4):
            raise InvalidStudyError(
                f"slices differ in Pixel Spacing: {first.source!r} has {list(first.pixel_spacing)} mm but "
                f"{s.source!r} has {list(s.pixel_spacing)} mm"
            )


def _angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip(a @ b, -1.0, 1.0)))


def _check_orientations(slices: Sequence[_Slice], rows: np.ndarray, normals: np.ndarray) -> None:
    """Tilted and variably tilted stacks pass; a mix of planes (axial with sagittal or a localizer) does not."""
    for name, vectors in (("slice normal", normals), ("row direction", rows)):
        angles = _angle_deg(vectors, vectors[0])
        worst = int(np.argmax(angles))
        if angles[worst] > MAX_ORIENTATION_DIFFERENCE_DEG:
            raise InvalidStudyError(
                f"the {name} of {slices[worst].source!r} differs by {angles[worst]:.1f} degrees from that of "
                f"{slices[0].source!r} (Image Orientation (Patient) {_orientation(slices[worst])} vs "
                f"{_orientation(slices[0])}); at most {MAX_ORIENTATION_DIFFERENCE_DEG:g} degrees (gantry tilt) "
                "is one stack"
            )


def _orientation(s: _Slice) -> list[float]:
    return [round(float(v), 4) for v in (*s.row_cosine, *s.col_cosine)]


def _check_duplicates(slices: Sequence[_Slice], along_normal: np.ndarray, order: np.ndarray) -> None:
    gaps = np.diff(along_normal[order])
    close = np.flatnonzero(gaps < DUPLICATE_POSITION_TOLERANCE_MM)
    if close.size:
        a, b = slices[order[close[0]]], slices[order[close[0] + 1]]
        raise InvalidStudyError(
            f"{a.source!r} and {b.source!r} are at the same position along the slice normal "
            f"({along_normal[order[close[0]]]:.3f} mm; Image Position (Patient) {a.position.round(3).tolist()} "
            f"and {b.position.round(3).tolist()}): duplicate slices"
        )
