"""The storage SOP classes and transfer syntaxes triage accepts, and which of those classes are images."""

from __future__ import annotations

import uuid

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom.sop_class import _STORAGE_CLASSES

# Every standard storage SOP class (PS3.4 Annex B, Table B.5-1) as pynetdicom maintains the list: a reading
# centre's radiologists read every modality, so a study of any kind reaches the worklist, analysed or not.
STORAGE_SOP_CLASSES: frozenset[str] = frozenset(str(uid) for uid in _STORAGE_CLASSES.values())

# Storage SOP classes whose IOD carries pixels although "Image" is not in their name: Pixel Data, Float Pixel
# Data or Double Float Pixel Data (PS3.3 C.7.6.3, C.8.32, C.8.20.2) is required by their IODs.
_PIXEL_IODS_WITHOUT_IMAGE_IN_NAME = frozenset(
    {
        "SegmentationStorage",
        "LabelMapSegmentationStorage",
        "HeightMapSegmentationStorage",
        "ParametricMapStorage",
        "EnhancedUSVolumeStorage",
        "OphthalmicThicknessMapStorage",
        "CornealTopographyMapStorage",
    }
)

# Image storage SOP classes: their IODs include the Image Pixel module (or its float variants), so an
# instance without pixels does not match its SOP class (PS3.4 B.2.3, 0xA900). Derived from the maintained list
# of storage classes: every "... Image Storage" class, plus the pixel-bearing ones named otherwise.
IMAGE_SOP_CLASSES: frozenset[str] = frozenset(
    str(uid)
    for keyword, uid in _STORAGE_CLASSES.items()
    if "Image" in keyword or keyword in _PIXEL_IODS_WITHOUT_IMAGE_IN_NAME
)

# Everything else (structured reports, presentation states, waveforms, encapsulated documents, RT objects,
# registrations, raw data): accepted so that a study reaches the worklist whole; never analysed by a model.
NON_IMAGE_SOP_CLASSES: frozenset[str] = STORAGE_SOP_CLASSES - IMAGE_SOP_CLASSES

ACCEPTED_SOP_CLASSES: frozenset[str] = STORAGE_SOP_CLASSES

SECONDARY_CAPTURE_SOP_CLASSES: frozenset[str] = frozenset(
    {
        SecondaryCaptureImageStorage,
        MultiFrameSingleBitSecondaryCaptureImageStorage,
        MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        MultiFrameTrueColorSecondaryCaptureImageStorage,
    }
)

# The elements that can hold an image's pixels (PS3.3 C.7.6.3 Pixel Data, C.7.6.24 Float / Double Float).
PIXEL_DATA_KEYWORDS: tuple[str, ...] = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


# Uncompressed transfer syntaxes: Pixel Data is native, so its length follows from the image attributes.
NATIVE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)

# Encapsulated (compressed) transfer syntaxes whose decoders are installed (pylibjpeg, openjpeg, pyjpegls).
# Lossless first, then lossy.
ENCAPSULATED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    RLELossless,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEGLSNearLossless,
    JPEG2000,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

# In order of preference: for each proposed presentation context the SCP accepts the first syntax of this list
# that the peer proposed (pynetdicom's acceptor negotiation). Uncompressed first, Explicit VR Little Endian
# leading because it keeps the VRs; then lossless, then lossy. The pipelines decode every one of them.
ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = NATIVE_TRANSFER_SYNTAXES + ENCAPSULATED_TRANSFER_SYNTAXES

# The Implementation Class UID written into the File Meta of every stored file (PS3.10 7.1): a UUID-derived
# UID under the 2.25 root (PS3.5 B.2), fixed so that files written by any triage installation are recognisable.
IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'triage/dicom-store').int}"
IMPLEMENTATION_VERSION_NAME = "TRIAGE_0_1"
# Private Information Creator UID (0002,0100) of the File Meta's Private Information (0002,0102), in which the
# store keeps who sent the instance in full (a STOW-RS account does not fit the 16 characters of an AE title).
SOURCE_INFO_CREATOR_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'triage/dicom-store/source').int}"


def is_accepted_sop_class(uid: str) -> bool:
    return str(uid) in ACCEPTED_SOP_CLASSES


def resolve_sop_classes(names: list[str] | tuple[str, ...]) -> frozenset[str]:
    """The storage SOP class UIDs a site's setting names, by UID or keyword ("MRImageStorage"); empty: all.

    Raises:
        ValueError: quoting a name that is neither a storage SOP class UID nor its keyword.
    """
    if not names:
        return STORAGE_SOP_CLASSES
    resolved: set[str] = set()
    for name in names:
        text = str(name).strip()
        uid = str(_STORAGE_CLASSES.get(text, text))
        if uid not in STORAGE_SOP_CLASSES:
            raise ValueError(
                f"not a storage SOP class: {text!r}; give a UID or a keyword such as 'MRImageStorage' "
                "(pynetdicom.sop_class lists them)"
            )
        resolved.add(uid)
    return frozenset(resolved)


def sop_class_name(uid: str) -> str:
    """The SOP class's name for messages ("MR Image Storage"), or the UID when pydicom does not know it."""
    return UID(str(uid)).name


def is_image_sop_class(uid: str) -> bool:
    return str(uid) in IMAGE_SOP_CLASSES


def is_accepted_transfer_syntax(uid: str) -> bool:
    return str(uid) in ACCEPTED_TRANSFER_SYNTAXES


def is_native_transfer_syntax(uid: str) -> bool:
    return str(uid) in NATIVE_TRANSFER_SYNTAXES
