"""QIDO-RS and WADO-RS (PS3.18 10.6, 10.4): list and retrieve what triage holds, so that a DICOMweb viewer (OHIF)
or `dicomweb-client` can open the studies on the worklist, with triage's own AI results beside the images.

Answers are built with pydicom (`Dataset.to_json_dict` for DICOM JSON, the stored Part-10 files as they are for
retrieval). A study's AI results (the TID 1500 SR, the SEG, the overlay capture: active models' findings only,
never a shadow model's) are the ones kept in the store and sent to the PACS (`triage.dicom.results.study_results`),
listed and retrieved as series of the study; they are built on the first request for the study if the results
deliverer has not built them yet. The reader's scope applies to them as to the images: a radiologist finds and
retrieves only the studies of sites they may read, and a refusal is audited. Patient Name and ID come from the
stored headers (the database keeps none); that identity was sent is audited (`view-identity`: QIDO-RS study
answers and WADO-RS metadata; `view-image`: retrieved instances).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydicom import dcmread
from pydicom.dataset import Dataset

from triage.dicom.results import reportable, study_results
from triage.domain import Finding, utcnow
from triage.errors import NotFoundError, TriageError
from triage.serve.auth import current_user
from triage.serve.deps import Audit, CurrentUser, ReadingDep, Service
from triage.storage import is_result_key, parse_instance_key, parse_result_key
from triage.worklist.repository import WorklistItem

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], dependencies=[Depends(current_user)])

DICOM_JSON = "application/dicom+json"
_CHUNK = 1 << 20
# Bulk data (pixels, overlays, waveforms) is left out of metadata answers, as WADO-RS metadata allows (it would be
# BulkDataURI; a viewer retrieves the instance itself).
_BULK_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}


def _json(items: list[dict[str, Any]]) -> Response:
    if not items:
        return Response(status_code=204)
    return JSONResponse(items, media_type=DICOM_JSON)


def _open(service: Any, key: str) -> BinaryIO:
    """A received instance or an AI result instance, by its key (each kind from its own area of the store)."""
    file: BinaryIO = service.files.open_result(key) if is_result_key(key) else service.files.open(key)
    return file


def _header(service: Any, key: str) -> Dataset | None:
    try:
        with _open(service, key) as handle:
            return dcmread(handle, stop_before_pixels=True, force=True)
    except (NotFoundError, OSError, ValueError):
        return None


def _result_keys(service: Any, study_uid: str, findings: Sequence[Finding], build: bool = True) -> list[str]:
    """The keys of the study's AI results for its findings as recorded now (an earlier analysis's are not listed);
    built and kept first when `build` and not yet built. [] without an active model's finding, or (logged) when
    they cannot be built: the images are still listed and retrieved."""
    active = reportable(findings)
    if not active:
        return []
    try:
        return study_results(service.files, study_uid, active, service.finding_codes(), build=build)
    except (TriageError, OSError) as exc:
        log.warning("study %s: AI results not available over DICOMweb: %s", study_uid, exc)
        return []


def _study_result_keys(service: Any, study_uid: str) -> list[str]:
    return _result_keys(service, study_uid, service.worklist.get_study(study_uid, utcnow()).findings)


def _result_series(service: Any, keys: Sequence[str]) -> dict[str, list[tuple[str, Dataset]]]:
    """The result instances' keys and headers by Series Instance UID, in key order."""
    series: dict[str, list[tuple[str, Dataset]]] = {}
    for key in keys:
        header = _header(service, key)
        if header is not None:
            series.setdefault(parse_result_key(key)[2], []).append((key, header))
    return series


def _study_json(
    item: WorklistItem, header: Dataset | None, n_series: int, results: Sequence[Dataset] = ()
) -> dict[str, Any]:
    ds = Dataset()
    ds.StudyInstanceUID = item.study_uid
    ds.AccessionNumber = item.accession_number
    ds.StudyDescription = item.study_description
    ds.StudyDate = item.study_date
    ds.StudyTime = item.study_time
    modalities = [m for m in item.modality.split("\\") if m] + [str(r.get("Modality", "")) for r in results]
    ds.ModalitiesInStudy = [m for m in dict.fromkeys(modalities) if m]
    ds.NumberOfStudyRelatedInstances = item.instance_count + len(results)
    ds.NumberOfStudyRelatedSeries = n_series + len({str(r.SeriesInstanceUID) for r in results})
    ds.InstitutionName = item.institution
    ds.PatientName = str(header.get("PatientName", "")) if header is not None else ""
    ds.PatientID = str(header.get("PatientID", "")) if header is not None else ""
    ds.PatientBirthDate = str(header.get("PatientBirthDate", "")) if header is not None else ""
    ds.PatientSex = str(header.get("PatientSex", "")) if header is not None else ""
    ds.StudyID = str(header.get("StudyID", "")) if header is not None else ""
    ds.ReferringPhysicianName = str(header.get("ReferringPhysicianName", "")) if header is not None else ""
    return ds.to_json_dict()


@router.get("/studies", summary="QIDO-RS: search for studies (DICOM JSON)")
async def search_studies(
    service: Service,
    user: CurrentUser,
    reading: ReadingDep,
    audit: Audit,
    study_uid: Annotated[str | None, Query(alias="StudyInstanceUID")] = None,
    accession: Annotated[str | None, Query(alias="AccessionNumber")] = None,
    modality: Annotated[str | None, Query(alias="ModalitiesInStudy")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    def find() -> list[dict[str, Any]]:
        worklist = service.worklist
        now = utcnow()
        if study_uid:
            try:
                # Outside the reader's scope: 403, audited as a refusal like every other read of the study.
                reading.check(study_uid, "dicomweb")
            except NotFoundError:
                return []
            items: list[WorklistItem] = [worklist.get_study(study_uid, now)]
        else:
            items = worklist.list_worklist(now, modality=modality, accession=accession, include_reported=True,
                                           limit=limit, offset=offset, scope=reading.scope)  # fmt: skip
        keys = worklist.first_instance_keys([i.study_uid for i in items])
        # One study asked for by UID (a viewer opening it) gets its results built if need be; a listing counts the
        # results already kept, so that a page of studies never waits for results to be built.
        results = {i.study_uid: _result_keys(service, i.study_uid, i.findings, build=bool(study_uid)) for i in items}
        return [
            _study_json(
                i,
                _header(service, keys[i.study_uid]) if i.study_uid in keys else None,
                len(worklist.series_of(i.study_uid)),
                [h for k in results[i.study_uid] if (h := _header(service, k)) is not None],
            )  # fmt: skip
            for i in items
        ]

    found = await asyncio.to_thread(find)
    if found:
        audit(user, "view-identity", None, via="qido-rs", studies=len(found))
    return _json(found)


def _series_json(study_uid: str, series: Any, header: Dataset | None) -> dict[str, Any]:
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series.series_uid
    ds.Modality = series.modality
    ds.SeriesDescription = str(series.attributes.get("SeriesDescription", ""))
    ds.NumberOfSeriesRelatedInstances = series.n_instances
    ds.SeriesNumber = header.get("SeriesNumber", None) if header is not None else None
    return ds.to_json_dict()


def _result_series_json(study_uid: str, series_uid: str, headers: Sequence[Dataset]) -> dict[str, Any]:
    first = headers[0]
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = str(first.get("Modality", ""))
    ds.SeriesDescription = str(first.get("SeriesDescription", ""))
    ds.NumberOfSeriesRelatedInstances = len(headers)
    ds.SeriesNumber = first.get("SeriesNumber", None)
    return ds.to_json_dict()


@router.get("/studies/{study_uid}/series", summary="QIDO-RS: the series of a study (DICOM JSON)")
async def search_series(study_uid: str, service: Service, reading: ReadingDep) -> Response:
    reading.check(study_uid, "dicomweb")

    def find() -> list[dict[str, Any]]:
        images = [
            _series_json(study_uid, s, _header(service, s.files[0]) if s.files else None)
            for s in service.worklist.series_of(study_uid)
        ]
        results = _result_series(service, _study_result_keys(service, study_uid))
        return images + [
            _result_series_json(study_uid, uid, [h for _, h in entries]) for uid, entries in results.items()
        ]

    return _json(await asyncio.to_thread(find))


@router.get(
    "/studies/{study_uid}/series/{series_uid}/instances", summary="QIDO-RS: the instances of a series (DICOM JSON)"
)
async def search_instances(study_uid: str, series_uid: str, service: Service, reading: ReadingDep) -> Response:
    reading.check(study_uid, "dicomweb")

    def find() -> list[dict[str, Any]]:
        found = []
        for series in service.worklist.series_of(study_uid):
            if series.series_uid != series_uid:
                continue
            for number, key in enumerate(series.files, start=1):
                ds = Dataset()
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
                ds.SOPClassUID = series.sop_class_uid
                ds.SOPInstanceUID = parse_instance_key(key)[2]
                ds.InstanceNumber = number
                found.append(ds.to_json_dict())
        if found:
            return found
        for _key, header in _result_series(service, _study_result_keys(service, study_uid)).get(series_uid, []):
            ds = Dataset()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPClassUID = header.SOPClassUID
            ds.SOPInstanceUID = header.SOPInstanceUID
            ds.InstanceNumber = header.get("InstanceNumber", None)
            found.append(ds.to_json_dict())
        return found

    return _json(await asyncio.to_thread(find))


def _keys(service: Any, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None) -> list[str]:
    """The keys of the study's instances (received images, then AI results), of one series or one instance."""
    keys = [
        key
        for series in service.worklist.series_of(study_uid)
        if series_uid is None or series.series_uid == series_uid
        for key in series.files
        if sop_uid is None or parse_instance_key(key)[2] == sop_uid
    ]
    if series_uid is None or not keys:
        keys += [
            key
            for key in _study_result_keys(service, study_uid)
            if (series_uid is None or parse_result_key(key)[2] == series_uid)
            and (sop_uid is None or parse_result_key(key)[3] == sop_uid)
        ]
    if not keys:
        raise NotFoundError(
            f"nothing stored for study {study_uid} series {series_uid or '*'} instance {sop_uid or '*'}"
        )
    return keys


def _multipart(service: Any, keys: list[str]) -> StreamingResponse:
    """The stored Part-10 files as they were received, one part each (multipart/related; application/dicom)."""
    boundary = secrets.token_hex(16)

    def parts() -> Iterator[bytes]:
        for key in keys:
            yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            with _open(service, key) as handle:
                while chunk := handle.read(_CHUNK):
                    yield chunk
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    media = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return StreamingResponse(parts(), media_type=media)


@router.get("/studies/{study_uid}", summary="WADO-RS: retrieve a study's instances (multipart/related)")
def retrieve_study(study_uid: str, service: Service, reading: ReadingDep, user: CurrentUser, audit: Audit) -> Response:
    reading.check(study_uid, "dicomweb")
    keys = _keys(service, study_uid)
    audit(user, "view-image", study_uid, via="wado-rs", instances=len(keys))
    return _multipart(service, keys)


@router.get("/studies/{study_uid}/series/{series_uid}", summary="WADO-RS: retrieve a series (multipart/related)")
def retrieve_series(
    study_uid: str, series_uid: str, service: Service, reading: ReadingDep, user: CurrentUser, audit: Audit
) -> Response:
    reading.check(study_uid, "dicomweb")
    keys = _keys(service, study_uid, series_uid)
    audit(user, "view-image", study_uid, via="wado-rs", instances=len(keys))
    return _multipart(service, keys)


@router.get(
    "/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}",
    summary="WADO-RS: retrieve one instance (multipart/related)",
)
def retrieve_instance(
    study_uid: str, series_uid: str, sop_uid: str, service: Service, reading: ReadingDep, user: CurrentUser,
    audit: Audit,
) -> Response:  # fmt: skip
    reading.check(study_uid, "dicomweb")
    keys = _keys(service, study_uid, series_uid, sop_uid)
    audit(user, "view-image", study_uid, via="wado-rs", instances=1)
    return _multipart(service, keys)


def _metadata(service: Any, keys: list[str]) -> list[dict[str, Any]]:
    out = []
    for key in keys:
        header = _header(service, key)
        if header is None:
            continue
        for element in list(header):
            if element.VR in _BULK_VRS:
                del header[element.tag]
        out.append(header.to_json_dict())
    return out


@router.get("/studies/{study_uid}/metadata", summary="WADO-RS: the study's instance metadata (DICOM JSON)")
async def study_metadata(
    study_uid: str, service: Service, reading: ReadingDep, user: CurrentUser, audit: Audit
) -> Response:
    reading.check(study_uid, "dicomweb")
    found = await asyncio.to_thread(lambda: _metadata(service, _keys(service, study_uid)))
    # The headers carry the patient's name, ID and birth date: audited as identity sent, like QIDO-RS answers.
    audit(user, "view-identity", study_uid, via="wado-rs-metadata", instances=len(found))
    return _json(found)


@router.get(
    "/studies/{study_uid}/series/{series_uid}/metadata", summary="WADO-RS: a series' instance metadata (DICOM JSON)"
)
async def series_metadata(
    study_uid: str, series_uid: str, service: Service, reading: ReadingDep, user: CurrentUser, audit: Audit
) -> Response:
    reading.check(study_uid, "dicomweb")
    found = await asyncio.to_thread(lambda: _metadata(service, _keys(service, study_uid, series_uid)))
    audit(user, "view-identity", study_uid, via="wado-rs-metadata", instances=len(found))
    return _json(found)
