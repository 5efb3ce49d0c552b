"""Patient identity read from a stored instance for a signed-in reader's page (header only)."""

from __future__ import annotations

import io

from tests.dicom_factory import make_radiograph
from triage.dicom.identity import read_identity
from triage.storage import MemorySource


def stored(**header: object) -> MemorySource:
    ds = make_radiograph("DX", 32, 32)
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return MemorySource({"a/b/c.dcm": buffer.getvalue()})


def test_name_id_age_and_sex_are_read_in_words() -> None:
    source = stored(PatientName="RAO^ANANYA^^DR", PatientID="MRN-0042", PatientAge="054Y", PatientSex="F")
    identity = read_identity(source, "a/b/c.dcm")
    assert identity is not None
    assert (identity.name, identity.patient_id, identity.age, identity.sex) == ("RAO, ANANYA", "MRN-0042", "54 y", "F")


def test_age_from_the_birth_date_when_patient_age_is_absent() -> None:
    source = stored(PatientName="X^Y", PatientBirthDate="20250110", StudyDate="20261204", PatientSex="")
    identity = read_identity(source, "a/b/c.dcm")
    assert identity is not None and identity.age == "22 mo" and identity.sex == ""


def test_a_missing_instance_gives_none() -> None:
    assert read_identity(MemorySource({}), "missing") is None
