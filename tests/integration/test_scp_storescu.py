"""The storage SCP and the store against the real DICOM client: dcmtk's storescu and echoscu as subprocesses.

Covers synthetic CT/DX/CR/SC/SR, MR/US/NM/PT/MG/XA and multi-frame instances, real compressed files from
pydicom's test data in every accepted transfer syntax dcmtk can propose, the real 28-slice head CT, duplicates,
refused instances, the calling-AE allow-list and the called AE title, a site's SOP class restriction, idle
sockets with 25 parallel senders, and the per-peer association limit.
"""

from __future__ import annotations

import logging
import socket
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, JPEGLSNearLossless
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.dicom_factory import (
    compress_dataset,
    make_ct_series,
    make_radiograph,
    make_secondary_capture,
    make_sr,
    write_dataset,
    write_datasets,
)
from tests.dicom_modalities import make_enhanced_mr, make_mr_series, make_other_modalities, make_us_image
from triage.config import DicomSettings
from triage.dicom.dcmtk import find_dcmtk
from triage.dicom.scp import StorageSCP
from triage.dicom.store import DicomStore, StorePolicy
from triage.domain import InstanceMeta

pytestmark = pytest.mark.integration

HEAD_CT = Path(__file__).resolve().parents[1] / "data" / "ct-head-ge"
MODALITY_AE = "TEST_MODALITY"

# storescu (dcmtk 3.6) proposes uncompressed syntaxes unless told which compressed one the files use.
PROPOSE = {
    "1.2.840.10008.1.2.1": [],
    "1.2.840.10008.1.2": ["-xi"],
    "1.2.840.10008.1.2.2": ["-xb"],
    "1.2.840.10008.1.2.1.99": ["-xd"],
    "1.2.840.10008.1.2.5": ["-xr"],
    "1.2.840.10008.1.2.4.50": ["-xy"],
    "1.2.840.10008.1.2.4.51": ["-xx"],
    "1.2.840.10008.1.2.4.70": ["-xs"],
    "1.2.840.10008.1.2.4.80": ["-xt"],
    "1.2.840.10008.1.2.4.81": ["-xu"],
    "1.2.840.10008.1.2.4.90": ["-xv"],
    "1.2.840.10008.1.2.4.91": ["-xw"],
}


def dcmtk(tool: str) -> str:
    """dcmtk's binary (pynetdicom installs Python apps of the same names into the virtual environment)."""
    path = find_dcmtk(tool)
    if path is None:
        pytest.fail(f"dcmtk's {tool} is not installed (apt-get install dcmtk): the real DICOM peer is required")
    return path


class Index:
    """The worklist's record_instance contract: False when the SOP Instance UID is already known."""

    def __init__(self) -> None:
        self.metas: dict[str, InstanceMeta] = {}
        self.duplicates: list[str] = []

    def __call__(self, meta: InstanceMeta) -> bool:
        if meta.sop_instance_uid in self.metas:
            self.duplicates.append(meta.sop_instance_uid)
            return False
        self.metas[meta.sop_instance_uid] = meta
        return True


class Service:
    def __init__(self, root: Path, **overrides: object) -> None:
        self.index = Index()
        settings = DicomSettings(
            port=0,
            bind_address="127.0.0.1",
            allowed_calling_aets=[MODALITY_AE],
            **overrides,  # type: ignore[arg-type]
        )
        self.store = DicomStore(root, "integration-salt", self.index, policy=StorePolicy.from_settings(settings))
        self.scp = StorageSCP(settings, self.store.write)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    running = Service(tmp_path_factory.mktemp("store"))
    running.scp.start()
    yield running
    running.scp.stop()


def storescu(
    port: int, files: Sequence[Path | str], options: Sequence[str] = (), calling_ae: str = MODALITY_AE
) -> subprocess.CompletedProcess[str]:
    command = [dcmtk("storescu"), "-v", "-nh", "-aet", calling_ae, "-aec", "TRIAGE", *options]
    command += ["127.0.0.1", str(port), *[str(f) for f in files]]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def assert_stored_unchanged(service: Service, sent: Sequence[Path | str]) -> None:
    """Each sent file is on disk, indexed, in its own transfer syntax, with byte-identical Pixel Data."""
    for path in sent:
        original = pydicom.dcmread(path)
        meta = service.index.metas[original.SOPInstanceUID]
        # The index holds the store's key, not a path; the store alone knows the file.
        assert meta.key == f"{original.StudyInstanceUID}/{original.SeriesInstanceUID}/{original.SOPInstanceUID}.dcm"
        stored = pydicom.dcmread(service.store.files.open(meta.key))
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert stored.get("PixelData") == original.get("PixelData")
        assert meta.calling_ae == MODALITY_AE


def test_echoscu_gets_an_answer(service: Service):
    result = subprocess.run(
        [dcmtk("echoscu"), "-v", "-aet", MODALITY_AE, "-aec", "TRIAGE", "127.0.0.1", str(service.scp.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr


def test_synthetic_ct_radiographs_captures_and_report_arrive_intact(service: Service, tmp_path: Path):
    datasets = [
        *make_ct_series(8, gantry_tilt_deg=12.0),
        make_radiograph("DX", photometric="MONOCHROME1"),
        make_radiograph("DX", for_processing=True),
        make_radiograph("CR"),
        make_secondary_capture(rgb=True),
        make_sr(),
    ]
    files = write_datasets(datasets, tmp_path)

    result = storescu(service.scp.port, files)

    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).count("Received Store Response (Success)") == len(files)
    assert_stored_unchanged(service, files)
    assert {service.index.metas[ds.SOPInstanceUID].modality for ds in datasets} == {"CT", "DX", "CR", "OT", "SR"}


REAL_FILES = [
    "JPEG2000.dcm",  # JPEG 2000 (lossy), secondary capture
    "693_J2KI.dcm",  # JPEG 2000 (lossy), CT
    "SC_rgb_rle.dcm",  # RLE Lossless
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG Baseline (Process 1)
    "JPEG-lossy.dcm",  # JPEG Extended (Process 2 & 4), 12 bit
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG Lossless SV1
    "image_dfl.dcm",  # Deflated Explicit VR Little Endian
    "SC_rgb_small_odd_big_endian.dcm",  # Explicit VR Big Endian
]


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_compressed_files_arrive_byte_identical(service: Service, name: str):
    path = get_testdata_file(name)
    syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)

    result = storescu(service.scp.port, [path], ["-R", *PROPOSE[syntax]])

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Received Store Response (Success)" in result.stdout + result.stderr
    assert_stored_unchanged(service, [path])


@pytest.mark.parametrize(
    ("syntax", "options"),
    [(JPEG2000Lossless, {}), (JPEGLSLossless, {}), (JPEGLSNearLossless, {"jls_error": 2})],
)
def test_compressed_ct_arrives_byte_identical(service: Service, tmp_path: Path, syntax: str, options: dict):
    path = write_dataset(compress_dataset(make_ct_series(1)[0], syntax, **options), tmp_path / "ct.dcm")

    result = storescu(service.scp.port, [path], ["-R", *PROPOSE[syntax]])

    assert result.returncode == 0, result.stdout + result.stderr
    assert_stored_unchanged(service, [path])


def test_real_head_ct_arrives_whole(service: Service):
    files = sorted(HEAD_CT.glob("*.dcm"))
    assert len(files) == 28, f"expected the 28-slice head CT in {HEAD_CT}"

    result = storescu(service.scp.port, files)

    assert result.returncode == 0, result.stderr
    assert_stored_unchanged(service, files)
    metas = [service.index.metas[pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID] for f in files]
    assert {(m.modality, m.body_part, m.study_uid) for m in metas} == {("CT", "HEAD", metas[0].study_uid)}
    assert len({m.series_uid for m in metas}) == 1
    assert all(m.patient_hash and m.patient_hash != "QMNx85rKkkg" for m in metas)


def test_a_resent_instance_is_a_duplicate(service: Service, tmp_path: Path):
    files = write_datasets(make_ct_series(2), tmp_path)
    assert storescu(service.scp.port, files).returncode == 0
    before = len(service.index.duplicates)

    result = storescu(service.scp.port, files)

    assert result.returncode == 0
    assert (result.stdout + result.stderr).count("Received Store Response (Success)") == 2
    assert len(service.index.duplicates) == before + 2
    key = service.index.metas[pydicom.dcmread(files[0]).SOPInstanceUID].key
    assert len(list((service.store.root / key).parent.iterdir())) == 2


def test_broken_instances_get_a_failure_status_and_the_scp_keeps_serving(service: Service, tmp_path: Path):
    no_pixels = make_ct_series(1)[0]
    del no_pixels.PixelData
    short_pixels = make_ct_series(1)[0]
    short_pixels.PixelData = short_pixels.PixelData[: len(short_pixels.PixelData) // 2]
    good = make_ct_series(1)[0]
    files = write_datasets([no_pixels, short_pixels, good], tmp_path)

    result = storescu(service.scp.port, files)
    output = result.stdout + result.stderr

    assert output.count("Received Store Response (Error: DataSetDoesNotMatchSOPClass)") == 2
    assert output.count("Received Store Response (Success)") == 1
    assert no_pixels.SOPInstanceUID not in service.index.metas
    assert short_pixels.SOPInstanceUID not in service.index.metas
    assert good.SOPInstanceUID in service.index.metas
    # Without --no-halt, storescu stops at the first failure and says so in its exit status.
    halted = subprocess.run(
        [dcmtk("storescu"), "-aet", MODALITY_AE, "127.0.0.1", str(service.scp.port), str(files[0])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert halted.returncode != 0
    assert storescu(service.scp.port, [files[2]]).returncode == 0


def test_a_real_file_without_study_instance_uid_is_refused(service: Service):
    path = get_testdata_file("JPEGLSNearLossless_16.dcm")  # JPEG-LS near-lossless, but no Study/Series UIDs

    result = storescu(service.scp.port, [path], ["-R", "-xu"])

    assert "Received Store Response (Error: DataSetDoesNotMatchSOPClass)" in result.stdout + result.stderr
    assert pydicom.dcmread(path).SOPInstanceUID not in service.index.metas


def test_a_sop_class_the_site_does_not_take_has_no_presentation_context(tmp_path: Path):
    restricted = Service(
        tmp_path / "store", accepted_sop_classes=["CTImageStorage", "DigitalXRayImageStorageForPresentation"]
    )
    restricted.scp.start()
    path = get_testdata_file("MR_small_implicit.dcm")
    try:
        result = storescu(restricted.scp.port, [path], ["-R"])
    finally:
        restricted.scp.stop()

    assert result.returncode != 0
    assert "no acceptable presentation context" in (result.stdout + result.stderr).lower()
    assert pydicom.dcmread(path).SOPInstanceUID not in restricted.index.metas


def test_mr_us_and_multiframe_instances_arrive_intact(service: Service, tmp_path: Path):
    real_mr = get_testdata_file("MR_small_implicit.dcm")
    instances = [*make_mr_series(2), make_enhanced_mr(5), make_us_image(), make_us_image(frames=3)]
    instances += list(make_other_modalities().values())
    files = [*write_datasets(instances, tmp_path), Path(real_mr)]

    result = storescu(service.scp.port, files)

    assert result.returncode == 0, result.stdout + result.stderr
    assert (result.stdout + result.stderr).count("Received Store Response (Success)") == len(files)
    assert_stored_unchanged(service, files)


def test_a_wrong_called_ae_title_is_rejected(service: Service, tmp_path: Path):
    path = write_dataset(make_ct_series(1)[0], tmp_path / "ct.dcm")

    command = [dcmtk("storescu"), "-aet", MODALITY_AE, "-aec", "PACS", "127.0.0.1", str(service.scp.port), str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)

    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stdout + result.stderr


def test_idle_sockets_and_25_parallel_senders_are_all_served(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """12 connections that never speak, then 25 storescu senders at once (the issue's figures): all stored."""
    caplog.set_level(logging.INFO, logger="triage")
    door = Service(tmp_path / "store")
    door.scp.start()
    idle = [socket.create_connection(("127.0.0.1", door.scp.port), timeout=60) for _ in range(12)]
    try:
        folders = []
        for n in range(25):
            folder = tmp_path / f"sender-{n:02d}"
            write_datasets(make_ct_series(2, rows=32, columns=32), folder)
            folders.append(folder)
        command = [dcmtk("storescu"), "-nh", "-aet", MODALITY_AE, "-aec", "TRIAGE", "127.0.0.1", str(door.scp.port)]
        senders = [
            subprocess.Popen(
                [*command, *map(str, sorted(f.iterdir()))], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            for f in folders
        ]
        outputs = [sender.communicate(timeout=120)[0].decode(errors="replace") for sender in senders]
        codes = [sender.returncode for sender in senders]
        # The association request timeout (5 s by default) closes the idle connections.
        closed = [s.recv(16) == b"" for s in idle]
    finally:
        for s in idle:
            s.close()
        door.scp.stop()

    assert codes == [0] * 25, "\n".join(o for o in outputs if "Success" not in o)[:4000]
    assert len(door.index.metas) == 50
    assert closed == [True] * 12
    assert "rejected" not in caplog.text


def test_one_peer_over_its_limit_is_rejected_transient_with_the_reason_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="triage")
    door = Service(tmp_path / "store", max_associations_per_peer=1)
    door.scp.start()
    ae = AE(ae_title=MODALITY_AE)
    ae.add_requested_context(Verification)
    holder = ae.associate("127.0.0.1", door.scp.port, ae_title="TRIAGE")
    path = write_dataset(make_ct_series(1)[0], tmp_path / "ct.dcm")
    try:
        assert holder.is_established
        rejected = storescu(door.scp.port, [path])
        holder.release()
        accepted = storescu(door.scp.port, [path])
    finally:
        ae.shutdown()
        door.scp.stop()

    assert rejected.returncode != 0
    assert "Local Limit Exceeded" in rejected.stdout + rejected.stderr
    assert accepted.returncode == 0
    assert "1 associations open from 127.0.0.1, at most 1 per peer" in caplog.text


def test_a_calling_ae_outside_the_allow_list_is_refused(service: Service, tmp_path: Path):
    ds = make_ct_series(1)[0]
    path = write_dataset(ds, tmp_path / "ct.dcm")

    result = storescu(service.scp.port, [path], calling_ae="INTRUDER")

    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    assert ds.SOPInstanceUID not in service.index.metas
