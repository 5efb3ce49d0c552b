"""QIDO-RS and WADO-RS (PS3.18 10.6, 10.4): list and retrieve what triage holds, so that a DICOMweb viewer (OHIF)
or `dicomweb-client` can open the studies on the worklist.

Answers are built with pydicom (`Dataset.to_json_dict` for DICOM JSON, the stored Part-10 files as they are for
retrieval). The reader's scope applies: a radiologist finds and retrieves only the studies of sites they may read.
Patient Name and ID come from the stored headers (the database keeps none); that identity was sent is audited.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydicom import dcmread
from pydicom.dataset import Dataset

from triage.domain import utcnow
from triage.errors import NotFoundError
from triage.serve.auth import current_user
from triage.serve.deps import Audit, CurrentUser, ReadingDep, Service
from triage.storage import parse_instance_key
from triage.worklist.repository import WorklistItem

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


def _header(service: Any, key: str) -> Dataset | None:
    try:
        with service.files.open(key) as handle:
            return dcmread(handle, stop_before_pixels=True, force=True)
    except (NotFoundError, OSError, ValueError):
        return None


def _study_json(item: WorklistItem, header: Dataset | None, n_series: int) -> dict[str, Any]:
    ds = Dataset()
    ds.StudyInstanceUID = item.study_uid
    ds.AccessionNumber = item.accession_number
    ds.StudyDescription = item.study_description
    ds.StudyDate = item.study_date
    ds.StudyTime = item.study_time
    ds.ModalitiesInStudy = [m for m in item.modality.split("\\") if m]
    ds.NumberOfStudyRelatedInstances = item.instance_count
    ds.NumberOfStudyRelatedSeries = n_series
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
                worklist.check_scope(study_uid, reading.scope)
            except NotFoundError:
                return []
            items: list[WorklistItem] = [worklist.get_study(study_uid, now)]
        else:
            items = worklist.list_worklist(now, modality=modality, accession=accession, include_reported=True,
                                           limit=limit, offset=offset, scope=reading.scope)  # fmt: skip
        keys = worklist.first_instance_keys([i.study_uid for i in items])
        return [
            _study_json(
                i,
                _header(service, keys[i.study_uid]) if i.study_uid in keys else None,
                len(worklist.series_of(i.study_uid)),
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


@router.get("/studies/{study_uid}/series", summary="QIDO-RS: the series of a study (DICOM JSON)")
async def search_series(study_uid: str, service: Service, reading: ReadingDep) -> Response:
    reading.check(study_uid, "dicomweb")

    def find() -> list[dict[str, Any]]:
        return [
            _series_json(study_uid, s, _header(service, s.files[0]) if s.files else None)
            for s in service.worklist.series_of(study_uid)
        ]

    return _json(await asyncio.to_thread(find))


@router.get(
    "/studies/{study_uid}/series/{series_uid}/instances", summary="QIDO-RS: the instances of a series (DICOM JSON)"
)
async def search_instances(study_uid: str, series_uid: str, service: Service, reading: ReadingDep) -> Response:
    reading.check(study_uid, "dicomweb")
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
    return _json(found)


def _keys(service: Any, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None) -> list[str]:
    keys = [
        key
        for series in service.worklist.series_of(study_uid)
        if series_uid is None or series.series_uid == series_uid
        for key in series.files
        if sop_uid is None or parse_instance_key(key)[2] == sop_uid
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
            with service.files.open(key) as handle:
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
async def study_metadata(study_uid: str, service: Service, reading: ReadingDep) -> Response:
    reading.check(study_uid, "dicomweb")
    return _json(await asyncio.to_thread(_metadata, service, _keys(service, study_uid)))


@router.get(
    "/studies/{study_uid}/series/{series_uid}/metadata", summary="WADO-RS: a series' instance metadata (DICOM JSON)"
)
async def series_metadata(study_uid: str, series_uid: str, service: Service, reading: ReadingDep) -> Response:
    reading.check(study_uid, "dicomweb")
    return _json(await asyncio.to_thread(_metadata, service, _keys(service, study_uid, series_uid)))
