"""The storage SOP classes and transfer syntaxes triage accepts, and which of those classes are images."""

from __future__ import annotations

import uuid

from pydicom.uid import (
    JPEG2000,
    BasicTextSRStorage,
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedCTImageStorage,
    EnhancedSRStorage,
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
    XRayRadiationDoseSRStorage,
)

# Image storage SOP classes (PS3.4 B.5): they must carry Pixel Data (7FE0,0010).
IMAGE_SOP_CLASSES: frozenset[str] = frozenset(
    {
        CTImageStorage,
        EnhancedCTImageStorage,
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        DigitalXRayImageStorageForProcessing,
        SecondaryCaptureImageStorage,
        MultiFrameSingleBitSecondaryCaptureImageStorage,
        MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        MultiFrameTrueColorSecondaryCaptureImageStorage,
    }
)

# Structured reports: accepted so that a study sent with its dose report reaches the worklist whole;
# never analysed by a model.
NON_IMAGE_SOP_CLASSES: frozenset[str] = frozenset(
    {XRayRadiationDoseSRStorage, BasicTextSRStorage, EnhancedSRStorage, ComprehensiveSRStorage}
)

ACCEPTED_SOP_CLASSES: frozenset[str] = IMAGE_SOP_CLASSES | NON_IMAGE_SOP_CLASSES

SECONDARY_CAPTURE_SOP_CLASSES: frozenset[str] = frozenset(
    {
        SecondaryCaptureImageStorage,
        MultiFrameSingleBitSecondaryCaptureImageStorage,
        MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        MultiFrameTrueColorSecondaryCaptureImageStorage,
    }
)

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


def is_accepted_sop_class(uid: str) -> bool:
    return str(uid) in ACCEPTED_SOP_CLASSES


def is_image_sop_class(uid: str) -> bool:
    return str(uid) in IMAGE_SOP_CLASSES


def is_accepted_transfer_syntax(uid: str) -> bool:
    return str(uid) in ACCEPTED_TRANSFER_SYNTAXES


def is_native_transfer_syntax(uid: str) -> bool:
    return str(uid) in NATIVE_TRANSFER_SYNTAXES
