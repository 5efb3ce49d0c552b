"""Write AI results as DICOM in the analysed study (SEG and TID 1500 report from `triage.dicom.measurements`, and
an overlay picture per finding as a Secondary Capture), keep them in the store and send them to PACS.

A study's results have a stable identity: their UIDs derive from what they are built from (`results_identity`), so
the same analysis gives the same Series and SOP Instance UIDs however often it is built or resent (a PACS that
took half of them before a retry gets the same instances again, not a second report), and a re-analysis whose
findings differ gets new ones. They are built once and kept (`study_results`); what goes to the PACS and what
triage's DICOMweb shows are the same stored files.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import ssl
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from triage.dicom.measurements import (
    Code,
    build_measurement_report,
    build_segmentation,
    finding_code,
    random_uid,
)
from triage.dicom.overlay import display_image, render_overlay
from triage.dicom.sender import send_datasets
from triage.dicom.sopclasses import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from triage.dicom.status import status_category
from triage.dicom.store import validate_uid
from triage.domain import Finding, Overlay
from triage.errors import InvalidStudyError, NotFoundError, TriageError
from triage.storage import (
    Store,
    overlay_from_bytes,
    parse_instance_key,
    result_key,
    segmentation_from_bytes,
)

log = logging.getLogger(__name__)

CAPTURE_SERIES_DESCRIPTION = "AI triage overlays (not for diagnostic use)"
MANUFACTURER = "triage"
DISCLAIMER = "AI triage aid, not a diagnosis."
SYNTHETIC_NOTICE = "synthetic demonstration model, not validated"
# Series numbers high enough not to collide with the modality's own series.
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
# Part of every results identity: raise it when what the builders write changes, so that results kept by an
# earlier release are built again (with new UIDs) instead of being served as they were.
RESULTS_FORMAT = 1


class ResultsExportError(TriageError):
    """Results could not be sent to the destination (no association, or the peer stopped answering)."""


Destination = tuple[str, str, int]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _new_instance(
    source_ds: Dataset,
    sop_class: str,
    series_number: int,
    now: datetime,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """A dataset in the source's patient and study, with the given (else new) Series and SOP Instance UIDs and File
    Meta."""
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
    ds.SOPInstanceUID = UID(sop_instance_uid or generate_uid())
    ds.SeriesInstanceUID = UID(series_uid or generate_uid())
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


def finding_caption(finding: Finding) -> str:
    """What an overlay picture of `finding` says under "NOT FOR DIAGNOSTIC USE": model, version, finding and
    probability, and a warning for a synthetic-data model."""
    text = f"{finding.model} {finding.model_version}: {finding.label} p={finding.probability:.2f}"
    if finding.synthetic:
        text += " (synthetic model)"
    return text


def build_overlay_capture(
    source_ds: Dataset,
    mask: np.ndarray,
    stride: int,
    caption: str,
    kind: str = "mask",
    now: datetime | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """A Secondary Capture (PS3.3 A.8.1) of the key image with the AI mask in red and a burned-in caption.

    Args:
        source_ds: the instance the overlay refers to, with its pixel data (a CT slice or a radiograph).
        mask: float32 (rows / stride, cols / stride) in [0, 1], on that instance's pixel grid.
        stride: the mask's integer downsampling factor.
        caption: what the overlay shows (model, label, probability); printed under "NOT FOR DIAGNOSTIC USE".
        kind: "mask" or "heatmap" (see `triage.dicom.overlay.draw_overlay`).
        now: content date and time (local wall clock when omitted).
        series_uid, sop_instance_uid: the capture's UIDs; new ones when omitted.

    Returns:
        8-bit RGB Secondary Capture in the source's study, in its own series, with Burned In Annotation YES and
        the source referenced in Source Image Sequence. The image is taller than the source by the caption band.

    Raises:
        InvalidStudyError: no decodable pixels, or a mask that does not fit the image.
        UnsupportedInputError: a colour CT or a multi-frame radiograph (an Enhanced CT shows its middle frame).
    """
    now = now or datetime.now()
    image = display_image(source_ds)
    rgb, _ = render_overlay(image, Overlay(image.sop_instance_uid, mask, stride, kind), [caption])
    ds = _new_instance(
        source_ds, SecondaryCaptureImageStorage, CAPTURE_SERIES_NUMBER, now, series_uid, sop_instance_uid
    )
    ds.Modality = "OT"
    ds.ConversionType = "WSD"  # workstation (PS3.3 C.8.6.1)
    ds.SeriesDescription = CAPTURE_SERIES_DESCRIPTION
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = f"AI overlay drawn by triage: {caption}"[:1024]
    ds.BurnedInAnnotation = "YES"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.PatientOrientation = source_ds.get("PatientOrientation", "") or ""
    # General Series Laterality (Type 2C, PS3.3 C.7.3.1): the source's, empty when it states none.
    ds.Laterality = source_ds.get("Laterality", "") or ""
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
    ssl_context: ssl.SSLContext | None = None,
) -> list[int]:
    """Send result instances to a storage SCP (PACS) with C-STORE, through the one C-STORE client
    (`triage.dicom.sender.send_datasets`).

    Args:
        datasets: instances from `build_result_sr` / `build_overlay_capture` (Explicit VR Little Endian).
        destination: (called AE title, host, port).
        calling_ae: our AE title, as the PACS knows it.
        timeout_s: ACSE, DIMSE and network timeout in seconds.
        ssl_context: DICOM over TLS (PS3.15 B.9) to a PACS that asks for it; None: plain TCP.

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
    report = send_datasets(datasets, host, int(port), called_ae, calling_ae, timeout_s=timeout_s,
                           ssl_context=ssl_context)  # fmt: skip
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


def _capture_for(
    store: Store, study_uid: str, finding: Finding, now: datetime, series_uid: str, sop_instance_uid: str
) -> Dataset | None:
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
    return build_overlay_capture(source, mask, stride, finding_caption(finding), kind=kind, now=now,
                                 series_uid=series_uid, sop_instance_uid=sop_instance_uid)  # fmt: skip


def _series_headers(store: Store, study_uid: str, keys: Sequence[str]) -> dict[str, list[Dataset]]:
    """The study's instance headers (no pixel data) by Series Instance UID."""
    by_series: dict[str, list[Dataset]] = {}
    for key in keys:
        with store.open(key) as handle:
            ds = dcmread(handle, stop_before_pixels=True)
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return by_series


def build_study_results(
    store: Store,
    study_uid: str,
    findings: Sequence[Finding],
    codes_by_label: Mapping[str, Code] | None = None,
    now: datetime | None = None,
    uid: Callable[..., str] | None = None,
) -> list[Dataset]:
    """The study's results as DICOM: a SEG per finding with a segmentation, the TID 1500 measurement report that
    references them, and one overlay capture per finding with an overlay (the picture a plain viewer shows).

    A finding whose stored segmentation or overlay cannot be used is reported without it (logged): the report
    still lists every finding.

    Args:
        uid: Makes each UID of the results from a name (see `result_uids`); new random UIDs when omitted.

    Raises:
        InvalidStudyError: when the study has no stored instance.
    """
    keys = _study_keys(store, study_uid)
    if not keys:
        raise InvalidStudyError(f"study {study_uid} has no stored instance")
    now = now or datetime.now()
    headers = _series_headers(store, study_uid, keys)
    codes_by_label = codes_by_label or {}
    evidence: list[Dataset] = []
    for finding in findings:
        series = headers.get(finding.series_uid) or next(iter(headers.values()))
        if all(ds.SeriesInstanceUID != series[0].SeriesInstanceUID for ds in evidence):
            evidence.append(series[0])
    segmentations: dict[int, Dataset] = {}
    overlays: dict[int, Overlay] = {}
    uid = uid or random_uid
    # One series per kind of result of this analysis: its SEGs side by side, its captures side by side.
    seg_series, capture_series = uid("seg-series"), uid("capture-series")
    for i, finding in enumerate(findings):
        if finding.segmentation_file and finding.series_uid in headers:
            try:
                masks = segmentation_from_bytes(store.get_overlay(study_uid, finding.segmentation_file))
                code = finding_code(finding, codes_by_label)
                seg = build_segmentation(
                    headers[finding.series_uid], masks, finding, code, series_uid=seg_series,
                    sop_instance_uid=uid("seg", i), tracking_uid=uid("seg-tracking", i),
                )  # fmt: skip
            except (TriageError, ValueError) as exc:
                log.warning("study %s: no segmentation for %s: %s", study_uid, finding.label, exc)
            else:
                seg.InstanceNumber = len(segmentations) + 1
                segmentations[i] = seg
        if finding.overlay_file:
            try:
                overlays[i] = overlay_from_bytes(store.get_overlay(study_uid, finding.overlay_file))
            except TriageError as exc:
                log.warning("study %s: overlay of %s not readable: %s", study_uid, finding.label, exc)
    if not evidence:
        evidence.append(next(iter(headers.values()))[0])
    all_headers = [ds for series in headers.values() for ds in series]
    for overlay in overlays.values():
        image = next((ds for ds in all_headers if ds.SOPInstanceUID == overlay.sop_instance_uid), None)
        if image is not None and all(ds.SOPInstanceUID != image.SOPInstanceUID for ds in evidence):
            evidence.append(image)
    report = build_measurement_report(evidence + list(segmentations.values()), findings, codes_by_label,
                                      segmentations, overlays, uid=uid)  # fmt: skip
    datasets = [report, *segmentations.values()]
    captures: list[Dataset] = []
    for i, finding in enumerate(findings):
        try:
            capture = _capture_for(store, study_uid, finding, now, capture_series, uid("capture", i))
        except TriageError as exc:
            # A missing or unusable overlay costs only its picture: the report still goes out with every finding.
            log.warning("study %s: no overlay capture for %s: %s", study_uid, finding.label, exc)
            continue
        if capture is not None:
            capture.InstanceNumber = len(captures) + 1
            captures.append(capture)
    return datasets + captures


def reportable(findings: Sequence[Finding]) -> list[Finding]:
    """The findings a study's results carry: active models' only (a shadow finding is never sent out or shown)."""
    return [f for f in findings if not f.shadow]


def _file_digest(store: Store, study_uid: str, name: str) -> str:
    try:
        return hashlib.sha256(store.get_overlay(study_uid, name)).hexdigest()
    except NotFoundError:
        return "missing"


def results_identity(
    store: Store, study_uid: str, findings: Sequence[Finding], codes_by_label: Mapping[str, Code] | None = None
) -> str:
    """The identity of a study's results: a digest of everything they are built from.

    That is the study, its findings as recorded (in order: model, version, label, probability, flag, details...),
    the coded type of each finding's label, and the bytes of the overlays and segmentations they name. A retry of
    the same analysis gives the same identity (and so the same UIDs); a re-analysis whose findings, masks or codes
    differ gives another. A re-analysis with exactly the same outcome keeps the results it had, so a PACS is not
    sent a second copy of the same report under new UIDs.

    Returns:
        32 lowercase hex digits (a results id, see `triage.storage.result_key`).
    """
    codes = codes_by_label or {}
    files = sorted({name for f in findings for name in (f.overlay_file, f.segmentation_file) if name})
    facts = {
        "format": RESULTS_FORMAT,
        "study": study_uid,
        "findings": [f.model_dump(mode="json") for f in findings],
        "codes": {f.label: list(codes[f.label]) for f in findings if f.label in codes},
        "files": {name: _file_digest(store, study_uid, name) for name in files},
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def result_uids(study_uid: str, results_id: str) -> Callable[..., str]:
    """Makes the UIDs of one study's results from a name ("sr", "seg-series", ("seg", 0) ...): the same names
    give the same UIDs for the same results id (pydicom's `generate_uid` with the names as its entropy sources)."""

    def uid(kind: str, *parts: object) -> str:
        return str(generate_uid(entropy_srcs=[study_uid, results_id, kind, *(str(p) for p in parts)]))

    return uid


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def study_results(
    store: Store,
    study_uid: str,
    findings: Sequence[Finding],
    codes_by_label: Mapping[str, Code] | None = None,
    build: bool = True,
) -> list[str]:
    """The result keys of the study's results for these findings, built (`build_study_results`) and kept in the
    store the first time they are asked for; the study's results of an earlier analysis are removed then.

    Args:
        findings: the findings to report: the caller passes active models' only (`reportable`: a shadow finding
            is never sent out or shown).
        build: False to answer only from what is stored ([] when these results have not been built yet).

    Raises:
        InvalidStudyError: when the results have to be built and the study has no stored instance.
        OSError: the store could not keep them.
    """
    study_uid = validate_uid(study_uid, "Study Instance UID (0020,000D)")
    results_id = results_identity(store, study_uid, findings, codes_by_label)
    keys = store.result_keys(study_uid, results_id)
    if keys or not build:
        return keys
    datasets = build_study_results(store, study_uid, findings, codes_by_label, uid=result_uids(study_uid, results_id))
    store.put_results(
        study_uid,
        results_id,
        {result_key(study_uid, results_id, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)): _part10(ds)
         for ds in datasets},
    )  # fmt: skip
    log.info("study %s: %d AI result instance(s) kept as results %s", study_uid, len(datasets), results_id)
    return store.result_keys(study_uid, results_id)


def read_results(store: Store, keys: Sequence[str]) -> list[Dataset]:
    """The stored result instances, as kept (Part-10, with their File Meta)."""
    datasets: list[Dataset] = []
    for key in keys:
        with store.open_result(key) as handle:
            datasets.append(dcmread(handle))
    return datasets


def export_study_results(
    store: Store,
    study_uid: str,
    findings: Sequence[Finding],
    ai_status: str,
    reason: str,
    destination: Destination,
    calling_ae: str = "TRIAGE",
    codes_by_label: Mapping[str, Code] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """Send the study's results (`study_results`: SEG, TID 1500 report, overlay captures, built and kept the first
    time) to PACS. Every attempt for the same findings sends the same stored instances, with the same UIDs.

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
        ResultsExportError: when the destination cannot be reached (see `send_results`), or the results were
            replaced by another analysis's while they were being kept (the next attempt sends the new ones).
    """
    keys = study_results(store, study_uid, findings, codes_by_label)
    if not keys:
        raise ResultsExportError(f"results of study {study_uid} were replaced while they were kept; not sent yet")
    datasets = read_results(store, keys)
    statuses = send_results(datasets, destination, calling_ae=calling_ae, ssl_context=ssl_context)
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
    if stored < len(datasets):
        # The PACS answered but refused some instances: not done (the outbox tries again, and says why).
        refused = sorted({f"0x{s:04X}" for s in statuses if status_category(s) not in ("success", "warning")})
        raise ResultsExportError(
            f"{called_ae}@{host}:{port} stored {stored} of {len(datasets)} result instances"
            f" (refused: {', '.join(refused)})"
        )
    return stored
