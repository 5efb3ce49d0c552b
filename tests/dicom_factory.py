"""Synthetic DICOM for tests: CT series, Enhanced CT, radiographs, secondary captures and SR, with real geometry.

Every dataset is a complete instance (File Meta included) that `save_as(..., enforce_file_format=True)` writes
as a valid Part-10 file and dcmtk's `storescu` sends. Nothing here is a real person: the patient attributes are
the SYNTHETIC_* constants below, chosen so a test can assert they never leak into logs or the database.

Geometry follows PS3.3 C.7.6.2: the centre of pixel (row i, column j) lies at
    ImagePositionPatient + j * PixelSpacing[1] * row_cosine + i * PixelSpacing[0] * column_cosine
in LPS millimetres (x to the patient's left, y to the back, z to the head). The CT content is a head phantom
defined in LPS, so tilted or unevenly spaced series show the same anatomy at the same patient positions.

Typical use::

    series = make_ct_series(24)                      # list[Dataset], one per slice
    paths = write_datasets(series, tmp_path / "ct")  # Part-10 files
    dx = make_radiograph(modality="DX", photometric="MONOCHROME1")
    j2k = compress_dataset(make_ct_series(2)[0], JPEG2000Lossless)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
    generate_uid,
)

SYNTHETIC_PATIENT_NAME = "SYNTHETIC^PATIENT"
SYNTHETIC_PATIENT_ID = "SYN-PID-0001"
SYNTHETIC_BIRTH_DATE = "19700101"
SYNTHETIC_ACCESSION = "SYNACC0001"
SYNTHETIC_INSTITUTION = "Synthetic General Hospital"

# Head phantom in LPS mm, centred on the origin (HU values typical of CT: air, bone, brain, CSF, fresh blood).
HU_AIR = -1000.0
HU_BONE = 1200.0
HU_BRAIN = 35.0
HU_CSF = 5.0
HU_BLOOD = 70.0
_HEAD_RADII_MM = (75.0, 95.0, 85.0)  # x (left-right), y (front-back), z (foot-head)
_SKULL_MM = 7.0


def new_uid() -> str:
    """A fresh UID (pydicom's root plus a random suffix)."""
    return str(generate_uid())


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str = ExplicitVRLittleEndian) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    return meta


def _base_dataset(
    sop_class: str,
    modality: str,
    *,
    study_uid: str | None,
    series_uid: str | None,
    sop_instance_uid: str | None = None,
    accession_number: str = SYNTHETIC_ACCESSION,
    patient_id: str = SYNTHETIC_PATIENT_ID,
    patient_name: str = SYNTHETIC_PATIENT_NAME,
    study_description: str = "",
    series_description: str = "",
    body_part: str = "",
    requested_priority: str | None = None,
    institution: str = SYNTHETIC_INSTITUTION,
    series_number: int = 1,
    instance_number: int = 1,
) -> Dataset:
    """Patient, study, series, equipment and SOP common attributes shared by every factory."""
    ds = Dataset()
    sop_instance = sop_instance_uid or new_uid()
    ds.file_meta = _file_meta(sop_class, sop_instance)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = UID(sop_instance)
    ds.StudyDate = "20240102"
    ds.StudyTime = "031500"
    ds.ContentDate = "20240102"
    ds.ContentTime = "031600"
    ds.AccessionNumber = accession_number
    ds.Modality = modality
    ds.Manufacturer = "triage tests"
    ds.InstitutionName = institution
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = SYNTHETIC_BIRTH_DATE
    ds.PatientSex = "O"
    if body_part:
        ds.BodyPartExamined = body_part
    ds.StudyInstanceUID = UID(study_uid or new_uid())
    ds.SeriesInstanceUID = UID(series_uid or new_uid())
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    if requested_priority is not None:
        ds.RequestedProcedurePriority = requested_priority
    return ds


def head_phantom_hu(points_lps: np.ndarray, haemorrhage_lps: Sequence[float] | None = None) -> np.ndarray:
    """HU of the synthetic head at LPS positions.

    Args:
        points_lps: (..., 3) positions in mm, LPS, head centred at the origin.
        haemorrhage_lps: centre (mm, LPS) of a 12 mm-radius spherical haematoma (70 HU) inside the brain,
            or None for a normal head.

    Returns:
        (...) float32 HU: air outside, a 7 mm skull, brain, two CSF ventricles, optional blood.
    """
    p = np.asarray(points_lps, dtype=np.float64)
    rx, ry, rz = _HEAD_RADII_MM
    outer = (p[..., 0] / rx) ** 2 + (p[..., 1] / ry) ** 2 + (p[..., 2] / rz) ** 2
    inner = (
        (p[..., 0] / (rx - _SKULL_MM)) ** 2 + (p[..., 1] / (ry - _SKULL_MM)) ** 2 + (p[..., 2] / (rz - _SKULL_MM)) ** 2
    )
    hu = np.full(p.shape[:-1], HU_AIR, dtype=np.float32)
    hu[outer <= 1.0] = HU_BONE
    hu[inner <= 1.0] = HU_BRAIN
    for side in (-1.0, 1.0):  # lateral ventricles, 8 mm either side of the midline
        ventricle = ((p[..., 0] - side * 8.0) / 5.0) ** 2 + ((p[..., 1] + 5.0) / 22.0) ** 2 + (p[..., 2] / 15.0) ** 2
        hu[ventricle <= 1.0] = HU_CSF
    if haemorrhage_lps is not None:
        centre = np.asarray(haemorrhage_lps, dtype=np.float64)
        blood = np.sum((p - centre) ** 2, axis=-1) <= 12.0**2
        hu[blood & (inner <= 1.0)] = HU_BLOOD
    return hu


def slice_pixel_positions(
    position_lps: Sequence[float],
    row_cosine: Sequence[float],
    column_cosine: Sequence[float],
    pixel_spacing_mm: Sequence[float],
    rows: int,
    columns: int,
) -> np.ndarray:
    """(rows, columns, 3) LPS mm centre of every pixel of one slice (PS3.3 C.7.6.2.1.1)."""
    i = np.arange(rows, dtype=np.float64)[:, None, None]
    j = np.arange(columns, dtype=np.float64)[None, :, None]
    origin = np.asarray(position_lps, dtype=np.float64)
    return (
        origin
        + j * float(pixel_spacing_mm[1]) * np.asarray(row_cosine, dtype=np.float64)
        + i * float(pixel_spacing_mm[0]) * np.asarray(column_cosine, dtype=np.float64)
    )


def _ct_geometry(
    n_slices: int,
    rows: int,
    columns: int,
    pixel_spacing_mm: tuple[float, float],
    spacing_mm: float,
    slice_offsets_mm: Sequence[float] | None,
    gantry_tilt_deg: float,
) -> tuple[list[float], list[float], list[list[float]]]:
    """Row/column cosines and one ImagePositionPatient per slice for an axial head scan.

    The table moves along z; with gantry tilt the image planes tilt about x, so consecutive positions are
    NOT along the slice normal (as on real tilted scans).
    """
    tilt = math.radians(gantry_tilt_deg)
    row_cosine = [1.0, 0.0, 0.0]
    column_cosine = [0.0, math.cos(tilt), -math.sin(tilt)]
    if slice_offsets_mm is None:
        offsets = [(k - (n_slices - 1) / 2.0) * spacing_mm for k in range(n_slices)]
    else:
        if len(slice_offsets_mm) != n_slices:
            raise ValueError(f"slice_offsets_mm has {len(slice_offsets_mm)} values for {n_slices} slices")
        offsets = [float(z) for z in slice_offsets_mm]
    # Centre the field of view on the head: the in-plane centre pixel lands on (0, 0, z).
    half_width = (columns - 1) / 2.0 * pixel_spacing_mm[1]
    half_height = (rows - 1) / 2.0 * pixel_spacing_mm[0]
    positions = []
    for z in offsets:
        centre = np.array([0.0, 0.0, z])
        corner = centre - half_width * np.array(row_cosine) - half_height * np.array(column_cosine)
        positions.append([round(float(v), 4) for v in corner])
    return row_cosine, [round(v, 7) for v in column_cosine], positions


def _hu_to_stored(hu: np.ndarray, rng: np.random.Generator, noise_hu: float) -> np.ndarray:
    noisy = hu + rng.normal(0.0, noise_hu, size=hu.shape) if noise_hu > 0 else hu
    # Stored = HU + 1024 (Rescale Intercept -1024, Slope 1), 12 bits stored in 16 allocated, unsigned.
    return np.clip(np.rint(noisy + 1024.0), 0, 4095).astype(np.uint16)


def make_ct_series(
    n_slices: int = 24,
    rows: int = 64,
    columns: int = 64,
    *,
    pixel_spacing_mm: tuple[float, float] = (3.5, 3.5),
    spacing_mm: float = 5.0,
    slice_thickness_mm: float | None = None,
    slice_offsets_mm: Sequence[float] | None = None,
    gantry_tilt_deg: float = 0.0,
    haemorrhage_lps: Sequence[float] | None = None,
    noise_hu: float = 3.0,
    seed: int = 0,
    shuffle_instance_numbers: bool = False,
    study_uid: str | None = None,
    series_uid: str | None = None,
    body_part: str = "HEAD",
    study_description: str = "CT HEAD WITHOUT CONTRAST",
    series_description: str = "Axial 5mm",
    convolution_kernel: str = "STANDARD",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    accession_number: str = SYNTHETIC_ACCESSION,
    patient_id: str = SYNTHETIC_PATIENT_ID,
    requested_priority: str | None = None,
) -> list[Dataset]:
    """An axial CT series of the head phantom, one CT Image Storage dataset per slice.

    Args:
        n_slices: number of slices.
        rows, columns: matrix size.
        pixel_spacing_mm: (row spacing, column spacing) in mm; the default covers a 224 mm field of view.
        spacing_mm: table increment between slices (ignored when `slice_offsets_mm` is given).
        slice_thickness_mm: SliceThickness; defaults to `spacing_mm`.
        slice_offsets_mm: z of each slice centre in mm (LPS), for uneven spacing; the order given is the
            acquisition order.
        gantry_tilt_deg: tilt of the image planes about the x axis; also written to GantryDetectorTilt.
        haemorrhage_lps: where to put a 12 mm haematoma (see `head_phantom_hu`), e.g. (30, 10, 0).
        noise_hu: standard deviation of Gaussian noise in HU (0: none).
        seed: makes noise and shuffling reproducible.
        shuffle_instance_numbers: assign InstanceNumber in random order, so code sorting by it goes wrong.
        study_uid, series_uid: reuse UIDs (e.g. several series in one study); fresh ones by default.

    Returns:
        `n_slices` datasets in acquisition order, pixels (rows, columns) uint16 = HU + 1024.
    """
    if n_slices < 1:
        raise ValueError(f"n_slices must be at least 1, got {n_slices}")
    rng = np.random.default_rng(seed)
    study_uid = study_uid or new_uid()
    series_uid = series_uid or new_uid()
    thickness = spacing_mm if slice_thickness_mm is None else slice_thickness_mm
    row_cosine, column_cosine, positions = _ct_geometry(
        n_slices, rows, columns, pixel_spacing_mm, spacing_mm, slice_offsets_mm, gantry_tilt_deg
    )
    numbers = list(range(1, n_slices + 1))
    if shuffle_instance_numbers:
        rng.shuffle(numbers)
    frame_of_reference = new_uid()
    datasets = []
    for index, position in enumerate(positions):
        ds = _base_dataset(
            CTImageStorage,
            "CT",
            study_uid=study_uid,
            series_uid=series_uid,
            accession_number=accession_number,
            patient_id=patient_id,
            study_description=study_description,
            series_description=series_description,
            body_part=body_part,
            requested_priority=requested_priority,
            instance_number=int(numbers[index]),
        )
        ds.ImageType = list(image_type)
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.KVP = "120"
        ds.SliceThickness = f"{thickness:g}"
        ds.ConvolutionKernel = convolution_kernel
        ds.GantryDetectorTilt = f"{gantry_tilt_deg:g}"
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.7f}" for v in row_cosine + column_cosine]
        ds.SliceLocation = f"{position[2]:.4f}"
        ds.PixelSpacing = [f"{pixel_spacing_mm[0]:g}", f"{pixel_spacing_mm[1]:g}"]
        _set_ct_pixels(ds, rows, columns)
        points = slice_pixel_positions(position, row_cosine, column_cosine, pixel_spacing_mm, rows, columns)
        ds.PixelData = _hu_to_stored(head_phantom_hu(points, haemorrhage_lps), rng, noise_hu).tobytes()
        datasets.append(ds)
    return datasets


def _set_ct_pixels(ds: Dataset, rows: int, columns: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "80"


def make_enhanced_ct(
    n_frames: int = 16,
    rows: int = 64,
    columns: int = 64,
    *,
    pixel_spacing_mm: tuple[float, float] = (3.5, 3.5),
    spacing_mm: float = 5.0,
    gantry_tilt_deg: float = 0.0,
    haemorrhage_lps: Sequence[float] | None = None,
    noise_hu: float = 3.0,
    seed: int = 0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    body_part: str = "HEAD",
) -> Dataset:
    """One Enhanced CT Image Storage instance: the head phantom as `n_frames` frames.

    Geometry lives in functional groups (PS3.3 C.7.6.16): Pixel Measures, Plane Orientation and Pixel Value
    Transformation shared; Plane Position and Frame Content per frame.
    """
    rng = np.random.default_rng(seed)
    row_cosine, column_cosine, positions = _ct_geometry(
        n_frames, rows, columns, pixel_spacing_mm, spacing_mm, None, gantry_tilt_deg
    )
    ds = _base_dataset(
        EnhancedCTImageStorage,
        "CT",
        study_uid=study_uid,
        series_uid=series_uid,
        study_description="CT HEAD WITHOUT CONTRAST",
        series_description="Enhanced axial",
        body_part=body_part,
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.FrameOfReferenceUID = new_uid()
    ds.PositionReferenceIndicator = ""
    ds.NumberOfFrames = n_frames
    _set_ct_pixels(ds, rows, columns)
    for keyword in ("RescaleIntercept", "RescaleSlope", "RescaleType", "WindowCenter", "WindowWidth"):
        delattr(ds, keyword)  # in the functional groups for Enhanced CT

    measures = Dataset()
    measures.PixelSpacing = [f"{pixel_spacing_mm[0]:g}", f"{pixel_spacing_mm[1]:g}"]
    measures.SliceThickness = f"{spacing_mm:g}"
    orientation = Dataset()
    orientation.ImageOrientationPatient = [f"{v:.7f}" for v in row_cosine + column_cosine]
    transformation = Dataset()
    transformation.RescaleIntercept = "-1024"
    transformation.RescaleSlope = "1"
    transformation.RescaleType = "HU"
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.PixelValueTransformationSequence = DicomSequence([transformation])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    per_frame = []
    frames = []
    for index, position in enumerate(positions):
        plane = Dataset()
        plane.ImagePositionPatient = [f"{v:.4f}" for v in position]
        content = Dataset()
        content.InStackPositionNumber = index + 1
        content.StackID = "1"
        item = Dataset()
        item.PlanePositionSequence = DicomSequence([plane])
        item.FrameContentSequence = DicomSequence([content])
        per_frame.append(item)
        points = slice_pixel_positions(position, row_cosine, column_cosine, pixel_spacing_mm, rows, columns)
        frames.append(_hu_to_stored(head_phantom_hu(points, haemorrhage_lps), rng, noise_hu))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.stack(frames).tobytes()
    return ds


def chest_radiograph_pixels(rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """A crude chest-like image, (rows, columns) float in [0, 1], 1 = dense (bone, mediastinum)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float64)
    y /= max(rows - 1, 1)
    x /= max(columns - 1, 1)
    image = np.full((rows, columns), 0.05)
    body = ((x - 0.5) / 0.45) ** 2 + ((y - 0.55) / 0.55) ** 2 <= 1.0
    image[body] = 0.55
    for centre in (0.3, 0.7):  # lungs, dark
        lung = ((x - centre) / 0.16) ** 2 + ((y - 0.45) / 0.3) ** 2 <= 1.0
        image[lung] = 0.15
    mediastinum = (np.abs(x - 0.5) < 0.07) & (y > 0.2) & (y < 0.8)
    image[mediastinum] = 0.8
    for k in range(6):  # ribs
        rib = np.abs(y - (0.25 + 0.09 * k) - 0.05 * np.abs(x - 0.5)) < 0.012
        image[rib & body] += 0.2
    image += rng.normal(0.0, 0.01, size=image.shape)
    return np.clip(image, 0.0, 1.0)


def make_radiograph(
    modality: str = "DX",
    rows: int = 256,
    columns: int = 256,
    *,
    photometric: str = "MONOCHROME2",
    for_processing: bool = False,
    view_position: str = "PA",
    body_part: str = "CHEST",
    pixel_spacing_mm: float = 1.4,
    bits_stored: int = 12,
    rescale: tuple[float, float] | None = None,
    seed: int = 0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    accession_number: str = SYNTHETIC_ACCESSION,
    patient_id: str = SYNTHETIC_PATIENT_ID,
    requested_priority: str | None = None,
) -> Dataset:
    """A chest radiograph: CR Image Storage for modality "CR", else DX (for presentation or processing).

    Args:
        modality: "DX" or "CR".
        photometric: "MONOCHROME2" (dense = bright) or "MONOCHROME1" (dense = dark, stored inverted).
        for_processing: DX For Processing instead of For Presentation.
        pixel_spacing_mm: ImagerPixelSpacing (at the detector), both directions.
        bits_stored: 8..16; stored values span 0 .. 2**bits_stored - 1.
        rescale: (slope, intercept) to write Rescale Slope/Intercept, or None to omit them.

    Returns:
        One dataset, pixels (rows, columns) uint16 (uint8 when bits_stored <= 8).
    """
    modality = modality.upper()
    if modality not in ("DX", "CR"):
        raise ValueError(f"modality must be 'DX' or 'CR', got {modality!r}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if modality == "CR":
        sop_class = ComputedRadiographyImageStorage
    elif for_processing:
        sop_class = DigitalXRayImageStorageForProcessing
    else:
        sop_class = DigitalXRayImageStorageForPresentation
    ds = _base_dataset(
        sop_class,
        modality,
        study_uid=study_uid,
        series_uid=series_uid,
        accession_number=accession_number,
        patient_id=patient_id,
        study_description=f"XR {body_part} {view_position}",
        series_description=view_position,
        body_part=body_part,
        requested_priority=requested_priority,
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ViewPosition = view_position
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [f"{pixel_spacing_mm:g}", f"{pixel_spacing_mm:g}"]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PROCESSING" if for_processing else "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
    density = chest_radiograph_pixels(rows, columns, seed)
    top = 2**bits_stored - 1
    stored = density if photometric == "MONOCHROME2" else 1.0 - density
    bits_allocated = 8 if bits_stored <= 8 else 16
    pixels = np.rint(stored * top).astype(np.uint8 if bits_allocated == 8 else np.uint16)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = f"{top / 2:g}"
    ds.WindowWidth = f"{top:g}"
    if rescale is not None:
        ds.RescaleSlope = f"{rescale[0]:g}"
        ds.RescaleIntercept = f"{rescale[1]:g}"
        ds.RescaleType = "US"
    ds.PixelData = pixels.tobytes()
    return ds


def make_secondary_capture(
    rows: int = 64,
    columns: int = 64,
    *,
    rgb: bool = False,
    n_frames: int = 1,
    seed: int = 0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    modality: str = "OT",
) -> Dataset:
    """A secondary capture: single-frame SC (grey or RGB), or Multi-frame True Color SC when rgb and n_frames > 1.

    The content is a gradient with a square, so lossless round trips can compare pixels exactly.
    """
    sop_class = (
        MultiFrameTrueColorSecondaryCaptureImageStorage if (rgb and n_frames > 1) else SecondaryCaptureImageStorage
    )
    if n_frames > 1 and not rgb:
        raise ValueError("multi-frame grey secondary capture is not generated here; use rgb=True or n_frames=1")
    ds = _base_dataset(
        sop_class,
        modality,
        study_uid=study_uid,
        series_uid=series_uid,
        study_description="SCREENSHOT",
        series_description="Secondary capture",
    )
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns]
    base = ((x + y) * 255 // max(rows + columns - 2, 1)).astype(np.uint8)
    base[rows // 4 : rows // 2, columns // 4 : columns // 2] = 255
    base = np.clip(base.astype(np.int16) + rng.integers(0, 3, size=base.shape), 0, 255).astype(np.uint8)
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if rgb:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        frame = np.stack([base, base[::-1], 255 - base], axis=-1)
        frames = np.stack([np.roll(frame, k, axis=1) for k in range(n_frames)])
        if n_frames > 1:
            ds.NumberOfFrames = n_frames
        ds.PixelData = frames.tobytes()
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = base.tobytes()
    return ds


def make_sr(
    sop_class: str = XRayRadiationDoseSRStorage,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    modality: str = "SR",
) -> Dataset:
    """A small structured report (default: X-Ray Radiation Dose SR): a CONTAINER with one TEXT item.

    Not template-conformant (TID 10011 is far larger); enough for a store that accepts SR and never analyses it.
    """
    if not str(sop_class).startswith("1.2.840.10008.5.1.4.1.1.88."):
        raise ValueError(f"{sop_class!r} is not an SR storage SOP class (1.2.840.10008.5.1.4.1.1.88.*)")
    ds = _base_dataset(
        sop_class,
        modality,
        study_uid=study_uid,
        series_uid=series_uid,
        study_description="CT HEAD WITHOUT CONTRAST",
        series_description="Dose report",
    )
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    title = Dataset()
    title.CodeValue = "113701"
    title.CodingSchemeDesignator = "DCM"
    title.CodeMeaning = "X-Ray Radiation Dose Report"
    ds.ConceptNameCodeSequence = DicomSequence([title])
    concept = Dataset()
    concept.CodeValue = "121106"
    concept.CodingSchemeDesignator = "DCM"
    concept.CodeMeaning = "Comment"
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = DicomSequence([concept])
    item.TextValue = "synthetic dose report"
    ds.ContentSequence = DicomSequence([item])
    return ds


def compress_dataset(ds: Dataset, transfer_syntax: str, **kwargs: object) -> Dataset:
    """A copy of `ds` with its Pixel Data compressed (RLE, JPEG-LS, JPEG 2000; pydicom's encoders).

    The SOP Instance UID is kept, so the copy is the same instance in another transfer syntax.
    """
    compressed = copy.deepcopy(ds)
    compressed.compress(transfer_syntax, generate_instance_uid=False, **kwargs)
    return compressed


def write_dataset(ds: Dataset, path: Path) -> Path:
    """Write `ds` as a Part-10 file at `path` (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_datasets(datasets: Iterable[Dataset], folder: Path, prefix: str = "IM") -> list[Path]:
    """Write datasets as `folder/<prefix><n>.dcm`, numbered in the order given."""
    return [write_dataset(ds, Path(folder) / f"{prefix}{index:04d}.dcm") for index, ds in enumerate(datasets, 1)]


def to_bytes(ds: Dataset) -> bytes:
    """`ds` as the bytes of a Part-10 file."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
