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
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE

from triage.dicom.radiograph import radiograph_from_dataset
from triage.dicom.sopclasses import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from triage.dicom.status import describe_status, status_category
from triage.dicom.store import check_decode_limits, validate_uid
from triage.errors import InvalidStudyError, NotFoundError, TriageError, UnsupportedInputError
from triage.storage import Store, overlay_from_bytes, parse_instance_key

log = logging.getLogger(__name__)

SERIES_DESCRIPTION = "AI triage results (not for diagnostic use)"
CAPTURE_SERIES_DESCRIPTION = "AI triage overlays (not for diagnostic use)"
MANUFACTURER = "triage"
DISCLAIMER = "AI triage aid, not a diagnosis."
SYNTHETIC_NOTICE = "synthetic demonstration model, not validated"
BURNED_IN_WARNING = "NOT FOR DIAGNOSTIC USE"
# Series numbers high enough not to collide with the modality's own series.
SR_SERIES_NUMBER = 9901
CAPTURE_SERIES_NUMBER = 9902
# CT brain window (level 40 HU, width 80 HU): the window a radiologist reads a head CT for haemorrhage in.
BRAIN_WINDOW_HU = (0.0, 80.0)
# Pixels whose mask value is at least this are drawn in red; heatmaps are blended in proportion instead.
MASK_THRESHOLD = 0.5
OVERLAY_ALPHA = 0.6
_RED = np.array([255.0, 0.0, 0.0])

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


def describe_finding(finding: dict[str, Any]) -> str:
    """One finding as the sentence written into the SR, e.g.
    "intracranial haemorrhage: probability 0.91, FLAGGED (model ct-head-ich 1.0.0; ...)"."""
    label = str(finding.get("label", "")) or "(unlabelled)"
    try:
        probability = f"{float(finding.get('probability', float('nan'))):.2f}"
    except (TypeError, ValueError):
        probability = str(finding.get("probability"))
    flagged = "FLAGGED" if finding.get("flagged") else "not flagged"
    model = f"model {finding.get('model', '?')} {finding.get('model_version', '?')}"
    if finding.get("synthetic"):
        model += f"; {SYNTHETIC_NOTICE}"
    text = f"{label}: probability {probability}, {flagged} ({model})"
    details = _format_details(dict(finding.get("details") or {}))
    if details:
        text += f". Details: {details}"
    if finding.get("series_uid"):
        text += f". Series {finding['series_uid']}"
    return text + "."


def _text_item(concept: tuple[str, str, str], text: str) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = DicomSequence([_code(*concept)])
    item.TextValue = text  # UT (PS3.3 C.17.3.2.1): no length limit worth worrying about
    return item


def build_result_sr(
    source_ds: Dataset,
    findings: Sequence[dict[str, Any]],
    study_ai_status: str,
    reason: str,
    now: datetime | None = None,
) -> Dataset:
    """A Basic Text SR (PS3.3 A.35.1) in the source's study listing every finding as text.

    Args:
        source_ds: any instance of the analysed study; its Patient and General Study modules are copied.
        findings: the finding records stored with the study (`Finding.to_dict()` plus `overlay_file`).
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
    if any(f.get("synthetic") for f in findings):
        items.append(
            _text_item(_COMMENT, f"Results marked synthetic come from a {SYNTHETIC_NOTICE}; do not act on them.")
        )
    items.append(_text_item(_COMMENT, DISCLAIMER))
    ds.ContentSequence = DicomSequence(items)
    return ds


def _display_values(source_ds: Dataset) -> np.ndarray:
    """The key image as a viewer would show it, float (rows, cols) in [0, 1].

    CT: Hounsfield units through Rescale Slope/Intercept, shown in the brain window 0-80 HU. Anything else
    (radiographs): the instance's own Modality and VOI LUTs (see `radiograph_from_dataset`).

    Raises:
        InvalidStudyError: when there is no decodable pixel data.
        UnsupportedInputError: for multi-frame or colour images.
    """
    if str(source_ds.get("Modality", "")).upper() != "CT":
        return np.asarray(radiograph_from_dataset(source_ds, source=str(source_ds.get("SOPInstanceUID", ""))).pixels)
    if "PixelData" not in source_ds:
        raise InvalidStudyError(f"CT instance {source_ds.get('SOPInstanceUID', '?')} has no pixel data")
    frames = int(source_ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 or int(source_ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise UnsupportedInputError(
            f"CT instance {source_ds.get('SOPInstanceUID', '?')} has NumberOfFrames={frames} and "
            f"SamplesPerPixel={source_ds.get('SamplesPerPixel')}; a capture is drawn from a single greyscale slice"
        )
    check_decode_limits(source_ds)
    try:
        stored = np.asarray(source_ds.pixel_array, dtype=np.float64)
    except Exception as exc:  # decoders raise a variety of errors on corrupt data
        raise InvalidStudyError(
            f"CT instance {source_ds.get('SOPInstanceUID', '?')}: cannot decode pixels: {exc}"
        ) from exc
    hu = stored * float(source_ds.get("RescaleSlope", 1) or 1) + float(source_ds.get("RescaleIntercept", 0) or 0)
    low, high = BRAIN_WINDOW_HU
    return np.clip((hu - low) / (high - low), 0.0, 1.0)


def _upsample(mask: np.ndarray, stride: int, shape: tuple[int, int]) -> np.ndarray:
    """The mask on the image's pixel grid: each mask pixel covers stride x stride image pixels."""
    if mask.ndim != 2:
        raise InvalidStudyError(f"overlay mask has shape {mask.shape}; expected (rows, cols)")
    if stride < 1:
        raise InvalidStudyError(f"overlay stride {stride!r} is not a positive integer")
    full = np.repeat(np.repeat(mask.astype(np.float32), stride, axis=0), stride, axis=1)
    rows, cols = shape
    if full.shape[0] + stride <= rows or full.shape[1] + stride <= cols or full.shape[0] > rows + stride:
        raise InvalidStudyError(
            f"overlay mask {mask.shape} with stride {stride} does not fit the image ({rows}, {cols})"
        )
    out = np.zeros(shape, dtype=np.float32)
    out[: min(rows, full.shape[0]), : min(cols, full.shape[1])] = full[:rows, :cols]
    return np.nan_to_num(np.clip(out, 0.0, 1.0))


def _caption_band(lines: Sequence[str], width: int) -> np.ndarray:
    """A black band with the lines in white, uint8 (band_rows, width, 3)."""
    from PIL import Image, ImageDraw, ImageFont

    size = max(10, width // 36)
    try:
        font: Any = ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    line_height = size + size // 2
    band = Image.new("RGB", (width, line_height * len(lines) + size // 2), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for index, line in enumerate(lines):
        draw.text((size // 2, size // 4 + index * line_height), line, fill=(255, 255, 255), font=font)
    return np.asarray(band, dtype=np.uint8)


def render_overlay(
    display: np.ndarray, mask: np.ndarray, stride: int, caption: str, kind: str = "mask"
) -> tuple[np.ndarray, int]:
    """Draw `mask` in red over a greyscale image and put a caption band on top.

    Args:
        display: float (rows, cols) in [0, 1], the image as a viewer shows it.
        mask: float (rows / stride, cols / stride) in [0, 1] on the image's pixel grid, downsampled by `stride`.
        stride: the mask's integer downsampling factor.
        caption: the second caption line (the first is "NOT FOR DIAGNOSTIC USE").
        kind: "mask" draws pixels at or above 0.5 in red; "heatmap" blends red in proportion to the value.

    Returns:
        (rgb, band_rows): uint8 (band_rows + rows, cols, 3), and how many rows the caption band takes.
    """
    grey = np.clip(np.asarray(display, dtype=np.float64), 0.0, 1.0) * 255.0
    weight = _upsample(np.asarray(mask), int(stride), grey.shape)
    alpha = weight * OVERLAY_ALPHA if kind == "heatmap" else np.where(weight >= MASK_THRESHOLD, OVERLAY_ALPHA, 0.0)
    rgb = grey[..., None] * (1.0 - alpha[..., None]) + _RED * alpha[..., None]
    image = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    band = _caption_band([BURNED_IN_WARNING, caption], grey.shape[1])
    return np.concatenate([band, image], axis=0), band.shape[0]


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
        kind: "mask" or "heatmap" (see `render_overlay`).
        now: content date and time (local wall clock when omitted).

    Returns:
        8-bit RGB Secondary Capture in the source's study, in a new series, with Burned In Annotation YES and
        the source referenced in Source Image Sequence. The image is taller than the source by the caption band.

    Raises:
        InvalidStudyError: no decodable pixels, or a mask that does not fit the image.
        UnsupportedInputError: multi-frame or colour source.
    """
    now = now or datetime.now()
    rgb, _ = render_overlay(_display_values(source_ds), mask, stride, caption, kind)
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


def _requested_contexts(datasets: Sequence[Dataset]) -> list[str]:
    classes = dict.fromkeys(str(ds.SOPClassUID) for ds in datasets)
    return list(classes)


def send_results(
    datasets: Sequence[Dataset],
    destination: Destination,
    calling_ae: str = "TRIAGE",
    timeout_s: float = 30.0,
) -> list[int]:
    """Send result instances to a storage SCP (PACS) with C-STORE over one association.

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
    ae = AE(ae_title=calling_ae)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class in _requested_contexts(datasets):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    statuses: list[int] = []
    try:
        assoc = ae.associate(host, int(port), ae_title=called_ae)
        if not assoc.is_established:
            why = "rejected (check the calling and called AE titles)" if assoc.is_rejected else "refused or timed out"
            raise ResultsExportError(f"cannot send AI results to {target}: association {why}")
        try:
            for ds in datasets:
                try:
                    response = assoc.send_c_store(ds)
                except (ValueError, RuntimeError, AttributeError) as exc:
                    raise ResultsExportError(
                        f"cannot send {UID(str(ds.SOPClassUID)).name} {ds.SOPInstanceUID} to {target}: {exc}; "
                        f"{len(statuses)} of {len(datasets)} stored before"
                    ) from exc
                if response is None or "Status" not in response:
                    raise ResultsExportError(
                        f"{target} stopped answering (association aborted or timed out) after "
                        f"{len(statuses)} of {len(datasets)} result instances"
                    )
                status = int(response.Status)
                statuses.append(status)
                if status_category(status) not in ("success", "warning"):
                    log.warning("%s refused result instance %s: %s", target, ds.SOPInstanceUID, describe_status(status))
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        ae.shutdown()
    return statuses


def _study_keys(store: Store, study_uid: str) -> list[str]:
    return list(store.instance_keys(validate_uid(study_uid, "Study Instance UID (0020,000D)")))


def _capture_for(store: Store, study_uid: str, finding: dict[str, Any], now: datetime) -> Dataset | None:
    """The overlay capture of one finding, or None when it has no overlay."""
    name = finding.get("overlay_file")
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
    probability = finding.get("probability")
    try:
        shown = f"p={float(probability):.2f}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        shown = f"p={probability}"
    caption = f"{finding.get('model', '?')} {finding.get('model_version', '?')}: {finding.get('label', '?')} {shown}"
    if finding.get("synthetic"):
        caption += " (synthetic model)"
    return build_overlay_capture(source, mask, stride, caption, kind=kind, now=now)


def export_study_results(
    store: Store,
    study_uid: str,
    findings: Sequence[dict[str, Any]],
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
        findings: the finding records as recorded (with `overlay_file`).
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
            log.warning("study %s: no overlay capture for %s: %s", study_uid, finding.get("label", "?"), exc)
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
