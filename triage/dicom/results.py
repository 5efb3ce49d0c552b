"""Write AI results as DICOM (a Basic Text SR and secondary captures) in the analysed study and send them to PACS."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from triage.dicom.overlay import display_image, render_overlay
from triage.dicom.sender import send_datasets
from triage.dicom.sopclasses import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from triage.dicom.status import status_category
from triage.dicom.store import validate_uid
from triage.domain import Finding, Overlay
from triage.errors import InvalidStudyError, NotFoundError, TriageError
from triage.storage import Store, overlay_from_bytes, parse_instance_key

log = logging.getLogger(__name__)

SERIES_DESCRIPTION = "AI triage results (not for diagnostic use)"
CAPTURE_SERIES_DESCRIPTION = "AI triage overlays (not for diagnostic use)"
MANUFACTURER = "triage"
DISCLAIMER = "AI triage aid, not a diagnosis."
SYNTHETIC_NOTICE = "synthetic demonstration model, not validated"
# Series numbers high enough not to collide with the modality's own series.
SR_SERIES_NUMBER = 9901
CAPTURE_SERIES_NUMBER = 9902

# PS3.3 C.7.1.1 Patient module and C.7.2.1 General Study module: what a result must repeat to be filed in the
# same patient and study by PACS (Type 2 attributes are written empty when the source lacks them).
_PATIENT_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientAge",
    "PatientWeight",
)
_STUDY_ATTRIBUTES = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
)
_TYPE2_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
_TYPE2_STUDY = ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")

# Coded concepts (PS3.16): document title, and the concept names of the text items.
_TITLE = ("18748-4", "LN", "Diagnostic Imaging Report")
_FINDING = ("121071", "DCM", "Finding")
_COMMENT = ("121106", "DCM", "Comment")


class ResultsExportError(TriageError):
    """Results could not be sent to the destination (no association, or the peer stopped answering)."""


Destination = tuple[str, str, int]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _new_instance(source_ds: Dataset, sop_class: str, series_number: int, now: datetime) -> Dataset:
    """A dataset in the source's patient and study, with new Series and SOP Instance UIDs and File Meta."""
    study_uid = validate_uid(source_ds.get("StudyInstanceUID"), "Study Instance UID (0020,000D)")
    ds = Dataset()
    # UTF-8 (PS3.3 C.12.1.1.2): names copied from the source keep their characters whatever its character set was.
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword in _PATIENT_ATTRIBUTES + _STUDY_ATTRIBUTES:
        if keyword in source_ds:
            ds[keyword] = source_ds[keyword]
    for keyword in _TYPE2_ATTRIBUTES + _TYPE2_STUDY:
        if keyword not in ds:
            setattr(ds, keyword, "")
    ds.StudyInstanceUID = study_uid
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "triage AI triage service"
    ds.SoftwareVersions = IMPLEMENTATION_VERSION_NAME
    ds.InstanceCreationDate = ds.ContentDate = ds.SeriesDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = ds.ContentTime = ds.SeriesTime = now.strftime("%H%M%S")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return ds


def _format_details(details: dict[str, Any]) -> str:
    """The finding's details a reader cares about, in a fixed order, then any others."""
    parts: list[str] = []
    if details.get("subtype"):
        parts.append(f"subtype {details['subtype']}")
    volume = details.get("volume_ml")
    if volume is not None:
        try:
            parts.append(f"volume {float(volume):.1f} ml")
        except (TypeError, ValueError):
            parts.append(f"volume {volume} ml")
    slices = details.get("slice_range")
    if slices:
        shown = f"{slices[0]}-{slices[-1]}" if isinstance(slices, list | tuple) and len(slices) >= 2 else slices
        parts.append(f"slices {shown}")
    for key in sorted(details):
        if key not in ("subtype", "volume_ml", "slice_range") and details[key] not in (None, "", [], {}):
            parts.append(f"{key} {details[key]}")
    return "; ".join(parts)


def describe_finding(finding: Finding) -> str:
    """One finding as the sentence written into the SR, e.g.
    "intracranial haemorrhage: probability 0.91, FLAGGED (model ct-head-ich 1.0.0; ...)"."""
    label = finding.label or "(unlabelled)"
    flagged = "FLAGGED" if finding.flagged else "not flagged"
    model = f"model {finding.model} {finding.model_version}"
    if finding.synthetic:
        model += f"; {SYNTHETIC_NOTICE}"
    text = f"{label}: probability {finding.probability:.2f}, {flagged} ({model})"
    details = _format_details(finding.details)
    if details:
        text += f". Details: {details}"
    if finding.series_uid:
        text += f". Series {finding.series_uid}"
    return text + "."


def finding_caption(finding: Finding) -> str:
    """What an overlay picture of `finding` says under "NOT FOR DIAGNOSTIC USE": model, version, finding and
    probability, and a warning for a synthetic-data model."""
    text = f"{finding.model} {finding.model_version}: {finding.label} p={finding.probability:.2f}"
    if finding.synthetic:
        text += " (synthetic model)"
    return text


def _text_item(concept: tuple[str, str, str], text: str) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = DicomSequence([_code(*concept)])
    item.TextValue = text  # UT (PS3.3 C.17.3.2.1): no length limit worth worrying about
    return item


def build_result_sr(
    source_ds: Dataset,
    findings: Sequence[Finding],
    study_ai_status: str,
    reason: str,
    now: datetime | None = None,
) -> Dataset:
    """A Basic Text SR (PS3.3 A.35.1) in the source's study listing every finding as text.

    Args:
        source_ds: any instance of the analysed study; its Patient and General Study modules are copied.
        findings: the study's findings as recorded.
        study_ai_status: the study's AI status ("done", "failed", ...), written as a comment.
        reason: the one-line reason recorded with that status.
        now: content date and time (local wall clock when omitted).

    Returns:
        The SR with File Meta (Explicit VR Little Endian), ready to write or send. It is marked UNVERIFIED:
        nobody has signed it (PS3.3 C.17.2).

    Raises:
        InvalidStudyError: when `source_ds` has no valid Study Instance UID.
    """
    now = now or datetime.now()
    ds = _new_instance(source_ds, BasicTextSRStorage, SR_SERIES_NUMBER, now)
    ds.Modality = "SR"
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence()  # Type 2 (PS3.3 C.17.1)
    ds.PerformedProcedureCodeSequence = DicomSequence()  # Type 2 (PS3.3 C.17.2)
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = DicomSequence([_code(*_TITLE)])
    ds.ContinuityOfContent = "SEPARATE"

    items = [_text_item(_FINDING, describe_finding(f)) for f in findings]
    if not findings:
        items.append(_text_item(_FINDING, "No AI findings were recorded for this study."))
    status_text = f"AI status: {study_ai_status}"
    if reason:
        status_text += f" ({reason})"
    items.append(_text_item(_COMMENT, status_text + "."))
    if any(f.synthetic for f in findings):
        items.append(
            _text_item(_COMMENT, f"Results marked synthetic come from a {SYNTHETIC_NOTICE}; do not act on them.")
        )
    items.append(_text_item(_COMMENT, DISCLAIMER))
    ds.ContentSequence = DicomSequence(items)
    return ds


def build_overlay_capture(
    source_ds: Dataset,
    mask: np.ndarray,
    stride: int,
    caption: str,
    kind: str = "mask",
    now: datetime | None = None,
) -> Dataset:
    """A Secondary Capture (PS3.3 A.8.1) of the key image with the AI mask in red and a burned-in caption.

    Args:
        source_ds: the instance the overlay refers to, with its pixel data (a CT slice or a radiograph).
        mask: float32 (rows / stride, cols / stride) in [0, 1], on that instance's pixel grid.
        stride: the mask's integer downsampling factor.
        caption: what the overlay shows (model, label, probability); printed under "NOT FOR DIAGNOSTIC USE".
        kind: "mask" or "heatmap" (see `triage.dicom.overlay.draw_overlay`).
        now: content date and time (local wall clock when omitted).

    Returns:
        8-bit RGB Secondary Capture in the source's study, in a new series, with Burned In Annotation YES and
        the source referenced in Source Image Sequence. The image is taller than the source by the caption band.

    Raises:
        InvalidStudyError: no decodable pixels, or a mask that does not fit the image.
        UnsupportedInputError: a colour CT or a multi-frame radiograph (an Enhanced CT shows its middle frame).
    """
    now = now or datetime.now()
    image = display_image(source_ds)
    rgb, _ = render_overlay(image, Overlay(image.sop_instance_uid, mask, stride, kind), [caption])
    ds = _new_instance(source_ds, SecondaryCaptureImageStorage, CAPTURE_SERIES_NUMBER, now)
    ds.Modality = "OT"
    ds.ConversionType = "WSD"  # workstation (PS3.3 C.8.6.1)
    ds.SeriesDescription = CAPTURE_SERIES_DESCRIPTION
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = f"AI overlay drawn by triage: {caption}"[:1024]
    ds.BurnedInAnnotation = "YES"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.PatientOrientation = source_ds.get("PatientOrientation", "") or ""
    reference = Dataset()
    reference.ReferencedSOPClassUID = source_ds.SOPClassUID
    reference.ReferencedSOPInstanceUID = source_ds.SOPInstanceUID
    ds.SourceImageSequence = DicomSequence([reference])
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(rgb.shape[0]), int(rgb.shape[1])
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = rgb.tobytes()
    return ds


def send_results(
    datasets: Sequence[Dataset],
    destination: Destination,
    calling_ae: str = "TRIAGE",
    timeout_s: float = 30.0,
) -> list[int]:
    """Send result instances to a storage SCP (PACS) with C-STORE, through the one C-STORE client
    (`triage.dicom.sender.send_datasets`).

    Args:
        datasets: instances from `build_result_sr` / `build_overlay_capture` (Explicit VR Little Endian).
        destination: (called AE title, host, port).
        calling_ae: our AE title, as the PACS knows it.
        timeout_s: ACSE, DIMSE and network timeout in seconds.

    Returns:
        The C-STORE status of each dataset, in order (0x0000 success; 0xB000-0xBFFF warnings also mean stored).

    Raises:
        ResultsExportError: when the association cannot be opened (refused, rejected, timed out), or the peer
            stops answering; the message names the destination and how many instances were stored.
    """
    called_ae, host, port = destination
    target = f"{called_ae}@{host}:{port}"
    if not datasets:
        return []
    report = send_datasets(datasets, host, int(port), called_ae, calling_ae, timeout_s=timeout_s)
    unanswered = [r for r in report.results if r.status is None]
    if unanswered:
        stored = len(report.results) - len(unanswered)
        error = unanswered[0].error
        if report.associations and not stored and ("associate" in error or "rejected" in error):
            why = "rejected (check the calling and called AE titles)" if "rejected" in error else "refused or timed out"
            raise ResultsExportError(f"cannot send AI results to {target}: association {why}")
        raise ResultsExportError(
            f"cannot send AI results to {target}: {error}; {stored} of {len(datasets)} result instances stored"
        )
    for result in report.failures:
        log.warning("%s refused result instance %s: %s", target, result.sop_instance_uid, result.error)
    return [int(r.status) for r in report.results if r.status is not None]


def _study_keys(store: Store, study_uid: str) -> list[str]:
    return list(store.instance_keys(validate_uid(study_uid, "Study Instance UID (0020,000D)")))


def _capture_for(store: Store, study_uid: str, finding: Finding, now: datetime) -> Dataset | None:
    """The overlay capture of one finding, or None when it has no overlay."""
    name = finding.overlay_file
    if not name:
        return None
    try:
        overlay = overlay_from_bytes(store.get_overlay(study_uid, str(name)), str(name))
    except NotFoundError as exc:
        raise InvalidStudyError(f"overlay {name} of study {study_uid} is not stored") from exc
    mask, stride, kind = overlay.mask, overlay.stride, overlay.kind
    sop_uid = validate_uid(overlay.sop_instance_uid, "overlay SOP Instance UID")
    matches = [key for key in _study_keys(store, study_uid) if parse_instance_key(key)[2] == sop_uid]
    if not matches:
        raise InvalidStudyError(f"study {study_uid} has no stored instance {sop_uid} for overlay {name}")
    with store.open(matches[0]) as handle:
        source = dcmread(handle)
    return build_overlay_capture(source, mask, stride, finding_caption(finding), kind=kind, now=now)


def export_study_results(
    store: Store,
    study_uid: str,
    findings: Sequence[Finding],
    ai_status: str,
    reason: str,
    destination: Destination,
    calling_ae: str = "TRIAGE",
) -> int:
    """Build the study's result SR and one overlay capture per finding with an overlay, and send them to PACS.

    Call it after the analysis is recorded: the worklist is already up to date, so a PACS that is down delays
    only the results in PACS, never the study's place on the worklist.

    Args:
        store: the store holding the study's instances and overlays.
        study_uid: the analysed study.
        findings: the study's findings as recorded (with `overlay_file`).
        ai_status, reason: the study's AI status and its reason.
        destination: (called AE title, host, port) of the PACS.
        calling_ae: our AE title.

    Returns:
        How many result instances the destination stored (success or warning status).

    Raises:
        InvalidStudyError: when the study has no stored instance. A finding whose overlay file or referenced
            instance is missing (or does not fit) is sent without its capture, with a warning in the log.
        ResultsExportError: when the destination cannot be reached (see `send_results`).
    """
    keys = _study_keys(store, study_uid)
    if not keys:
        raise InvalidStudyError(f"study {study_uid} has no stored instance")
    with store.open(keys[0]) as handle:
        source = dcmread(handle, stop_before_pixels=True)
    now = datetime.now()
    datasets = [build_result_sr(source, findings, ai_status, reason, now=now)]
    for finding in findings:
        try:
            capture = _capture_for(store, study_uid, finding, now)
        except TriageError as exc:
            # A missing or unusable overlay costs only its picture: the SR still goes out with every finding.
            log.warning("study %s: no overlay capture for %s: %s", study_uid, finding.label, exc)
            continue
        if capture is not None:
            capture.InstanceNumber = len(datasets)
            # One capture series per export: all captures of this analysis side by side.
            if len(datasets) > 1:
                capture.SeriesInstanceUID = datasets[1].SeriesInstanceUID
            datasets.append(capture)
    statuses = send_results(datasets, destination, calling_ae=calling_ae)
    stored = sum(1 for s in statuses if status_category(s) in ("success", "warning"))
    called_ae, host, port = destination
    log.info(
        "study %s: %d of %d AI result instances stored by %s@%s:%s",
        study_uid,
        stored,
        len(datasets),
        called_ae,
        host,
        port,
    )
    return stored
