"""Synthetic instances of modalities no triage model reads (MR, US, NM, PT, MG, XA, ...), for the "every
study is listed" tests: built from tests/dicom_factory.py's generators, so the geometry stays real.

Nothing here is a real person (the factory's SYNTHETIC_* patient attributes).
"""

from __future__ import annotations

import copy

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DigitalMammographyXRayImageStorageForPresentation,
    EnhancedMRImageStorage,
    MRImageStorage,
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    XRayAngiographicImageStorage,
)

from tests.dicom_factory import make_ct_series, make_enhanced_ct, make_radiograph, new_uid

_CT_ONLY = ("RescaleIntercept", "RescaleSlope", "RescaleType", "KVP", "ConvolutionKernel")


def _as_class(ds: Dataset, sop_class: str, modality: str) -> Dataset:
    """`ds` turned into another SOP class and modality, with a fresh SOP Instance UID."""
    out = copy.deepcopy(ds)
    out.SOPClassUID = out.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = UID(new_uid())
    out.Modality = modality
    for keyword in _CT_ONLY:
        if keyword in out:
            delattr(out, keyword)
    return out


def make_mr_series(n_slices: int = 4, study_uid: str | None = None) -> list[Dataset]:
    """An axial MR series of the head (MR Image Storage), one instance per slice, CT phantom geometry."""
    series_uid = new_uid()
    out = []
    for ds in make_ct_series(n_slices, rows=32, columns=32, study_uid=study_uid, series_uid=series_uid):
        mr = _as_class(ds, MRImageStorage, "MR")
        mr.StudyDescription = "MR BRAIN"
        mr.SeriesDescription = "T2 axial"
        mr.ScanningSequence = "SE"
        mr.SequenceVariant = "NONE"
        mr.ScanOptions = ""
        mr.MRAcquisitionType = "2D"
        mr.EchoTime = "90"
        mr.RepetitionTime = "4000"
        out.append(mr)
    return out


def make_enhanced_mr(n_frames: int = 6, study_uid: str | None = None) -> Dataset:
    """One Enhanced MR Image Storage instance of `n_frames` frames (multi-frame, functional groups)."""
    ds = make_enhanced_ct(n_frames, rows=32, columns=32, study_uid=study_uid)
    mr = _as_class(ds, EnhancedMRImageStorage, "MR")
    mr.StudyDescription = "MR BRAIN"
    mr.SeriesDescription = "Enhanced T1"
    return mr


def make_us_image(frames: int = 1, study_uid: str | None = None) -> Dataset:
    """An ultrasound image, 8-bit grey: US Image Storage, or US Multi-frame Image Storage for `frames` > 1."""
    ds = make_radiograph(rows=48, columns=64, study_uid=study_uid)
    sop_class = UltrasoundMultiFrameImageStorage if frames > 1 else UltrasoundImageStorage
    us = _as_class(ds, sop_class, "US")
    us.StudyDescription = "US ABDOMEN"
    us.BitsAllocated = us.BitsStored = 8
    us.HighBit = 7
    us.PixelRepresentation = 0
    us.PhotometricInterpretation = "MONOCHROME2"
    for keyword in ("ViewPosition", "ImagerPixelSpacing", "PresentationIntentType", "WindowCenter", "WindowWidth"):
        if keyword in us:
            delattr(us, keyword)
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 255, size=(frames, int(us.Rows), int(us.Columns)), dtype=np.uint8)
    if frames > 1:
        us.NumberOfFrames = frames
        us.FrameIncrementPointer = 0x00181063  # Frame Time
        us.FrameTime = "33.3"
    us.PixelData = pixels.tobytes()
    return us


def make_other_modalities(study_uid: str | None = None) -> dict[str, Dataset]:
    """One instance each of NM, PT, MG and XA (single frame), named by modality."""
    ct = make_ct_series(1, rows=32, columns=32, study_uid=study_uid)[0]
    dx = make_radiograph(rows=48, columns=48, study_uid=study_uid)
    return {
        "NM": _as_class(ct, NuclearMedicineImageStorage, "NM"),
        "PT": _as_class(ct, PositronEmissionTomographyImageStorage, "PT"),
        "MG": _as_class(dx, DigitalMammographyXRayImageStorageForPresentation, "MG"),
        "XA": _as_class(dx, XRayAngiographicImageStorage, "XA"),
    }
