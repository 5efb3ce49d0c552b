"""Benchmark the worklist page (`GET /worklist`, first page) and its live refresh (`GET /worklist/rows`) with 5,000
open studies on SQLite, through FastAPI's TestClient as an admin and as a credentialed radiologist.

Fills a fresh embedded worklist (a temporary data directory) with `Worklist.record_instances` in batches: one
instance per study, received over the last hours, two registered sites (told apart by Institution Name) and a
third unregistered sender, a mix of requested priorities, and a finished analysis with a finding for a share of
them (a few flagged). Unless --no-files, each study's instance is also written to the store as a small header-only
DICOM file with a synthetic patient, so that the page reads identity for its 100 rows as it does in service;
with --no-files those reads find nothing and the page shows "-".

A benchmark, not a test: the figures (median of --runs requests, after one warm-up) are printed, nothing is
asserted.

Usage: python benchmarks/worklist_page.py [--studies 5000] [--runs 7] [--no-files]
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastapi.testclient import TestClient  # noqa: E402

from triage.config import ServiceRole, Settings  # noqa: E402
from triage.domain import AIStatus, InstanceMeta  # noqa: E402
from triage.serve.app import create_app  # noqa: E402
from triage.serve.service import TriageService  # noqa: E402
from triage.worklist.sites import parse_site  # noqa: E402

CT = "1.2.840.10008.5.1.4.1.1.2"
CR = "1.2.840.10008.5.1.4.1.1.1"
ADMIN_PASSWORD = "bench-admin-password"
READER_PASSWORD = "bench-reader-password"
INSTITUTIONS = ["North Hospital", "South Clinic", "Elsewhere Imaging"]  # the last: no registered site


def header_file(path: Path, meta: InstanceMeta, n: int) -> None:
    """A header-only DICOM file with a synthetic patient (what `read_identity` reads)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = meta.sop_class_uid
    file_meta.MediaStorageSOPInstanceUID = meta.sop_instance_uid
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=file_meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.sop_class_uid, meta.sop_instance_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = meta.study_uid, meta.series_uid
    ds.PatientName = f"BENCH^PATIENT{n:05d}"
    ds.PatientID = f"BENCH{n:06d}"
    ds.PatientAge = f"{20 + n % 70:03d}Y"
    ds.PatientSex = "MF"[n % 2]
    ds.StudyDate, ds.StudyTime = "20240305", "024000"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def populate(service: TriageService, n: int, with_files: bool, seed: int = 7) -> None:
    """`n` open studies, recorded in batches of 500 (the store's group commit does the same)."""
    worklist = service.worklist
    now = datetime.now(UTC)
    for record in (
        {"name": "NORTH HOSPITAL", "institution_names": [INSTITUTIONS[0]], "time_zone": "Europe/London"},
        {"name": "SOUTH CLINIC", "institution_names": [INSTITUTIONS[1]], "time_zone": "Asia/Kolkata",
         "turnaround_min": {"stat": 30}},
    ):  # fmt: skip
        worklist.save_site(parse_site(record), "bench", now, create=True)
    rng = random.Random(seed)
    batch: list[tuple[InstanceMeta, datetime]] = []
    analysed: list[tuple[str, bool, float]] = []
    for i in range(n):
        ct = rng.random() < 0.5
        study = f"2.25.{rng.getrandbits(100)}"
        meta = InstanceMeta(
            study_uid=study,
            series_uid=f"{study}.1",
            sop_instance_uid=f"{study}.1.1",
            sop_class_uid=CT if ct else CR,
            modality="CT" if ct else "CR",
            key=f"{study}/{study}.1/{study}.1.1.dcm",
            accession_number=f"ACC{i:06d}",
            patient_hash=f"{i:012x}",
            study_description="CT HEAD WITHOUT CONTRAST" if ct else "XR CHEST PA",
            institution=rng.choice(INSTITUTIONS),
            calling_ae="MODALITY",
            requested_priority=rng.choices(["", "HIGH", "STAT"], weights=[80, 15, 5])[0],
            study_date="20240305",
            study_time="024000",
            indication=rng.choice(["", "Headache", "Fall, on anticoagulants", "Shortness of breath"]),
        )
        if with_files:
            header_file(service.files.local_path(meta.key), meta, i)
        batch.append((meta, now - timedelta(minutes=rng.expovariate(1 / 600))))
        if rng.random() < 0.4:
            analysed.append((study, ct, rng.random()))
        if len(batch) == 500:
            worklist.record_instances(batch)
            batch = []
    if batch:
        worklist.record_instances(batch)
    for study, ct, p in analysed:
        label, model = ("intracranial_haemorrhage", "ct-head-ich") if ct else ("pneumothorax", "xr-chest-pneumothorax")
        probability = p**4
        finding = {
            "label": label,
            "probability": probability,
            "flagged": probability >= 0.5,
            "model": model,
            "model_version": "1.0.0",
            "synthetic": False,
            "details": {"volume_ml": 3.2} if ct else {},
        }
        generation = worklist.begin_analysis(study, now, worker="bench")
        worklist.finish_analysis(study, generation, [finding], [], AIStatus.DONE, "analysed", now)


def sign_in(client: TestClient, name: str, password: str) -> None:
    form = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None
    response = client.post(
        "/login",
        data={"username": name, "password": password, "csrf_token": token.group(1), "next": "/worklist"},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text


def median_ms(client: TestClient, path: str, runs: int) -> tuple[float, int]:
    """Median milliseconds of `runs` GETs of `path` (after one warm-up), and the rows in the last answer."""
    response = client.get(path)
    assert response.status_code == 200, response.text[:500]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200
    return statistics.median(times), response.text.count("<tr data-study=")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--no-files", action="store_true", help="no DICOM files: identity reads find nothing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the per-row "identity not readable" warnings of --no-files

    with tempfile.TemporaryDirectory(prefix="triage-bench-page-") as tmp:
        settings = Settings(data_dir=Path(tmp) / "data", weights_dir=Path(tmp) / "no-weights")
        settings.weights_dir.mkdir()
        settings.admin_password = ADMIN_PASSWORD
        # The API role only (as an API replica runs): nothing is analysed behind the benchmark's back.
        roles = frozenset({ServiceRole.API})
        service = TriageService(settings, runner_kind="inprocess", start_scp=False, roles=roles)
        app = create_app(settings, runner_kind="inprocess", service=service, roles=roles)
        with TestClient(app, base_url="http://testserver") as admin:
            start = time.perf_counter()
            populate(service, args.studies, with_files=not args.no_files)
            print(f"filled {args.studies} open studies in {time.perf_counter() - start:.1f} s "
                  f"({'with' if not args.no_files else 'without'} header files for identity)")  # fmt: skip
            app.state.accounts.add_user("reader", "radiologist", READER_PASSWORD, datetime.now(UTC))
            service.worklist.sites.grant("reader", "NORTH HOSPITAL", None, "bench", datetime.now(UTC))
            sign_in(admin, "admin", ADMIN_PASSWORD)
            reader = TestClient(app, base_url="http://testserver")
            sign_in(reader, "reader", READER_PASSWORD)
            print(f"{'who':<8} {'request':<44} {'median ms':>10} {'rows':>6}")
            for who, client in (("admin", admin), ("reader", reader)):
                for path in (
                    "/worklist",
                    "/worklist/rows",
                    "/worklist?offset=2000",
                    "/worklist?flagged=true&claimed=false",
                    "/worklist?modality=CT&level=routine",
                ):
                    ms, rows = median_ms(client, path, args.runs)
                    print(f"{who:<8} {path:<44} {ms:>10.1f} {rows:>6}")


if __name__ == "__main__":
    main()
