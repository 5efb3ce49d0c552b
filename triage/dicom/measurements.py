"""AI results as standard DICOM objects built with highdicom: a DICOM Segmentation of a finding's mask on the
source series, and a TID 1500 Measurement Report (Comprehensive 3D SR) with one measurement group per finding.

This follows the IHE AI Results (AIR) profile's shape: the report carries, per finding, its coded type, presence
and probability, the algorithm (model name and version), volumes where measured, and the location (the segment
of the SEG, the centroid in patient coordinates, or a point on the image the overlay was drawn on), all in the
analysed study; the secondary-capture picture (`triage.dicom.results`) stays as the fallback a plain viewer shows.
highdicom's typed constructors check what they are given (codes, references, geometry) instead of attributes set
one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    CoordinatesForMeasurement3D,
    DeviceObserverIdentifyingAttributes,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    ReferencedSegment,
    SourceImageForRegion,
    SourceSeriesForSegmentation,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from triage.dicom.sopclasses import IMPLEMENTATION_VERSION_NAME
from triage.domain import Finding, Overlay, SliceMasks
from triage.errors import InvalidStudyError

MANUFACTURER = "triage"
MODEL_NAME = "triage AI triage service"
NOT_FOR_DIAGNOSIS = "AI triage aid, not a diagnosis; not for diagnostic use."
SYNTHETIC_NOTICE = "synthetic demonstration model, not validated"
SR_SERIES_NUMBER = 9903
SEG_SERIES_NUMBER = 9904

# A private coding scheme (PS3.16 8.2: designators starting "99" are local) for what no standard code says.
PRIVATE_SCHEME = "99TRIAGE"
_PROBABILITY = CodedConcept("ai-probability", PRIVATE_SCHEME, "AI probability of the finding")
_SUBTYPE_VOLUME = "volume of {} component"
_VOLUME = CodedConcept("118565006", "SCT", "Volume")
_ML = CodedConcept("ml", "UCUM", "milliliter")
_NO_UNITS = CodedConcept("1", "UCUM", "no units")
_PRESENCE = CodedConcept("705057003", "SCT", "Presence")
_PRESENT = CodedConcept("52101004", "SCT", "Present")
_ABSENT = CodedConcept("2667000", "SCT", "Absent")
_ABNORMAL_STRUCTURE = CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
_IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging")
_COMMENT = CodedConcept("121106", "DCM", "Comment")

Code = tuple[str, str, str]  # (value, scheme designator, meaning)

# The observer device of every report (TID 1004 Device Observer UID): triage itself, the same in every report.
DEVICE_UID = generate_uid(entropy_srcs=[MANUFACTURER, MODEL_NAME, "device observer"])


def random_uid(*_parts: object) -> str:
    """A new UID whatever it is for (where no stable identity is asked for)."""
    return str(generate_uid())


# Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) that highdicom copies from
# the source: a source that leaves them out gets them empty, as the standard allows, rather than no result.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")  # fmt: skip


def _complete(headers: Sequence[Dataset]) -> list[Dataset]:
    """Copies of `headers` (no pixel data) with the Type 2 attributes a derived object copies present."""
    out = []
    for ds in headers:
        copy = Dataset()
        copy.update({tag: elem for tag, elem in ds.items() if tag != 0x7FE00010})
        if hasattr(ds, "file_meta"):
            copy.file_meta = ds.file_meta
        for keyword in _TYPE2:
            if keyword not in copy:
                setattr(copy, keyword, "")
        out.append(copy)
    return out


def _carry_deidentification(result: Dataset, source: Dataset) -> None:
    """A source marked de-identified makes the result so too (PS3.3 C.7.1.1: Patient Identity Removed YES needs
    a De-identification Method, Type 1C); a source that named no method gets that said rather than left empty."""
    if str(source.get("PatientIdentityRemoved", "")).upper() != "YES":
        return
    result.PatientIdentityRemoved = "YES"
    if source.get("DeidentificationMethodCodeSequence"):
        result.DeidentificationMethodCodeSequence = source.DeidentificationMethodCodeSequence
    method = str(source.get("DeidentificationMethod", "") or "").strip()
    if method or "DeidentificationMethodCodeSequence" not in result:
        result.DeidentificationMethod = (method or "as received: source de-identified, no method stated")[:64]


def finding_code(finding: Finding, codes_by_label: Mapping[str, Code]) -> CodedConcept:
    """The coded finding type from the model card (`findings[].code`), or a local code naming the label."""
    code = codes_by_label.get(finding.label)
    if code is not None:
        return CodedConcept(*code)
    return CodedConcept(finding.label[:16] or "finding", PRIVATE_SCHEME, finding.label.replace("_", " ") or "finding")


def _algorithm(finding: Finding) -> AlgorithmIdentification:
    return AlgorithmIdentification(name=finding.model, version=finding.model_version, manufacturer=MANUFACTURER)


def build_segmentation(
    source_images: Sequence[Dataset],
    segmentation: SliceMasks,
    finding: Finding,
    code: CodedConcept,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    tracking_uid: str | None = None,
) -> Dataset:
    """A binary DICOM Segmentation of `finding` on the source series' own images (tilt and uneven spacing kept:
    each frame references its source image and takes that image's position).

    Args:
        source_images: The analysed series' instances (headers suffice), any order.
        segmentation: The masks per source image (`SliceMasks`, full pixel grid).
        finding: The finding the segment shows (its model and version are the segment's algorithm).
        code: The segmented property type (the finding's coded type).
        series_uid: The SEG's series (one per analysis); a new one when omitted.
        sop_instance_uid: The SEG's SOP Instance UID; a new one when omitted (`triage.dicom.results` derives it
            from the analysis, so that a resend carries the same UID).
        tracking_uid: The segment's Tracking UID; a new one when omitted.

    Raises:
        InvalidStudyError: when a masked image is not among `source_images`, or a mask's shape is not its image's.
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in _complete(source_images)}
    missing = [uid for uid in segmentation.sop_instance_uids if uid not in by_uid]
    if missing:
        raise InvalidStudyError(f"segmentation names image {missing[0]} that is not in the source series")
    ordered = sorted(by_uid.values(), key=lambda ds: int(ds.get("InstanceNumber", 0) or 0))
    frames = np.zeros((len(ordered), int(ordered[0].Rows), int(ordered[0].Columns)), dtype=bool)
    index = {str(ds.SOPInstanceUID): i for i, ds in enumerate(ordered)}
    for uid, mask in zip(segmentation.sop_instance_uids, segmentation.masks, strict=True):
        if mask.shape != frames.shape[1:]:
            raise InvalidStudyError(f"segmentation of image {uid} is {mask.shape}, the image {frames.shape[1:]}")
        frames[index[uid]] = mask
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=finding.label.replace("_", " ")[:64],
        segmented_property_category=_ABNORMAL_STRUCTURE,
        segmented_property_type=code,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=finding.model, family=codes.cid7162.ArtificialIntelligence, version=finding.model_version
        ),
        tracking_uid=tracking_uid or generate_uid(),
        tracking_id=f"{finding.model} {finding.label}"[:64],
    )
    notice = NOT_FOR_DIAGNOSIS + (f" {SYNTHETIC_NOTICE}." if finding.synthetic else "")
    seg = hd.seg.Segmentation(
        source_images=ordered,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=series_uid or generate_uid(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=IMPLEMENTATION_VERSION_NAME,
        device_serial_number="0",
        content_description=notice[:64],
        content_label="AI_TRIAGE",
        series_description=f"AI segmentation: {finding.label} (not for diagnostic use)"[:64],
    )
    _carry_deidentification(seg, ordered[0])
    return seg


def _overlay_point(overlay: Overlay) -> np.ndarray | None:
    """The weighted centre of an overlay, in the pixel coordinates (column, row) of its full-size image."""
    mask = np.asarray(overlay.mask, dtype=np.float64)
    total = mask.sum()
    if total <= 0:
        return None
    rows, cols = np.indices(mask.shape)
    # Cell i of a strided mask covers pixels [i * stride, (i + 1) * stride); in SR pixel coordinates (PS3.3
    # C.18.6.1.2: the top left corner of the first pixel is 0,0) its centre is (i + 0.5) * stride.
    row = (float((rows * mask).sum() / total) + 0.5) * overlay.stride
    col = (float((cols * mask).sum() / total) + 0.5) * overlay.stride
    return np.array([[col, row]])


def _measurements(finding: Finding, frame_of_reference_uid: str) -> list[Measurement]:
    """Probability, volume (with the centroid as its 3D point where `frame_of_reference_uid` is given; a segment
    locates a finding that has one) and the volume of each subtype."""
    algorithm = _algorithm(finding)
    out = [Measurement(name=_PROBABILITY, value=float(finding.probability), unit=_NO_UNITS, algorithm_id=algorithm)]
    volume = finding.details.get("volume_ml")
    if isinstance(volume, int | float) and volume > 0:
        centroid = finding.details.get("centroid_lps_mm")
        coordinates = None
        if isinstance(centroid, list) and len(centroid) == 3 and frame_of_reference_uid:
            coordinates = [
                CoordinatesForMeasurement3D(
                    graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                    graphic_data=np.array([centroid], dtype=float),
                    frame_of_reference_uid=frame_of_reference_uid,
                )
            ]
        out.append(
            Measurement(
                name=_VOLUME, value=float(volume), unit=_ML, algorithm_id=algorithm, referenced_coordinates=coordinates
            )
        )
        subtypes = finding.details.get("class_volumes_ml") or {}
        for name, value in sorted(subtypes.items()):
            if isinstance(value, int | float) and value > 0:
                concept = CodedConcept(f"volume-{name}"[:16], PRIVATE_SCHEME, _SUBTYPE_VOLUME.format(name))
                out.append(Measurement(name=concept, value=float(value), unit=_ML, algorithm_id=algorithm))
    return out


def build_measurement_report(
    evidence: Sequence[Dataset],
    findings: Sequence[Finding],
    codes_by_label: Mapping[str, Code],
    segmentations: Mapping[int, Dataset] | None = None,
    overlays: Mapping[int, Overlay] | None = None,
    uid: Callable[..., str] | None = None,
) -> Dataset:
    """A TID 1500 Measurement Report (Comprehensive 3D SR) with one measurement group per finding.

    Args:
        evidence: One instance (header) of each analysed series, and any SEG written for the findings; the report
            lists them as its evidence and copies the patient and study from them.
        findings: The study's findings (active models only: shadow findings are never sent out).
        codes_by_label: The coded finding type per label (from the model cards).
        segmentations: The SEG written for finding i (its segment 1 is that finding), by index into `findings`.
        overlays: The overlay of finding i (a point on its image locates a finding without a SEG).
        uid: Makes the report's UIDs from a name: uid("sr-series"), uid("sr"), uid("tracking", i) for finding i
            (`triage.dicom.results` derives them from the analysis, so that a resend carries the same UIDs); new
            random UIDs when omitted.

    Returns:
        The SR, unverified and complete ("not for diagnostic use" and the synthetic-model notice in a comment
        item and its series description).

    Raises:
        InvalidStudyError: when there is no evidence to file the report with.
    """
    if not evidence:
        raise InvalidStudyError("a measurement report needs at least one instance of the analysed study")
    segmentations = segmentations or {}
    overlays = overlays or {}
    uid = uid or random_uid
    evidence = _complete(evidence)
    source = evidence[0]
    frame_of_reference = str(source.get("FrameOfReferenceUID", "") or "")
    series_of = {str(ds.SOPInstanceUID): ds for ds in evidence}
    groups: list[Any] = []
    for i, finding in enumerate(findings):
        tracking = TrackingIdentifier(uid=uid("tracking", i), identifier=f"{finding.model} {finding.label}"[:64])
        common: dict[str, Any] = {
            "tracking_identifier": tracking,
            "finding_type": finding_code(finding, codes_by_label),
            "algorithm_id": _algorithm(finding),
            # A finding with a segment is located by it (a volumetric group takes no coordinates); one without, by
            # its centroid in patient coordinates on the measured volume.
            "measurements": _measurements(finding, "" if segmentations.get(i) is not None else frame_of_reference),
            "qualitative_evaluations": [
                QualitativeEvaluation(name=_PRESENCE, value=_PRESENT if finding.flagged else _ABSENT)
            ],
        }
        seg = segmentations.get(i)
        overlay = overlays.get(i)
        if seg is not None:
            referenced = ReferencedSegment(
                sop_class_uid=str(seg.SOPClassUID),
                sop_instance_uid=str(seg.SOPInstanceUID),
                segment_number=1,
                source_series=SourceSeriesForSegmentation(finding.series_uid or str(source.SeriesInstanceUID)),
            )
            groups.append(VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=referenced, **common))
            continue
        point = _overlay_point(overlay) if overlay is not None else None
        image = series_of.get(overlay.sop_instance_uid) if overlay is not None else None
        if point is not None and image is not None:
            region = ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POINT,
                graphic_data=point,
                source_image=SourceImageForRegion(str(image.SOPClassUID), str(image.SOPInstanceUID)),
            )
            groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common))
        else:
            groups.append(MeasurementsAndQualitativeEvaluations(**common))
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=DEVICE_UID, name="triage", manufacturer_name=MANUFACTURER, model_name=MODEL_NAME
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=_IMAGING_PROCEDURE,
        imaging_measurements=groups or None,
    )
    # Notices a reader of the report must see; TID 1500 is extensible, so a Comment under the root container.
    notes = [NOT_FOR_DIAGNOSIS]
    if any(f.synthetic for f in findings):
        notes.append(f"Findings marked synthetic come from a {SYNTHETIC_NOTICE}; do not act on them.")
    for text in notes:
        report[0].ContentSequence.append(
            hd.sr.TextContentItem(name=_COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        )
    synthetic = " (synthetic model)" if any(f.synthetic for f in findings) else ""
    sr = Comprehensive3DSR(
        evidence=list(evidence),
        content=report[0],
        series_instance_uid=uid("sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uid("sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=f"AI measurements{synthetic}, not for diagnostic use"[:64],
    )
    _carry_deidentification(sr, source)
    return sr
