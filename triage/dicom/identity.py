"""The patient's identity as the images carry it, read from a stored instance for a signed-in reader's page.

The worklist database keeps no names, IDs or birth dates (STYLE: a salted hash of the Patient ID only); a reader
needs them to read the right patient, so the pages read them from the study's first stored instance, header only,
when they show the study. Never logged: callers audit that identity was shown, not what it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date

from pydicom import dcmread
from pydicom.valuerep import PersonName

from triage.storage import InstanceSource

log = logging.getLogger(__name__)

_IDENTITY_TAGS = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyDate"]


@dataclass(frozen=True)
class PatientIdentity:
    """Name (as "Family, Given"), Patient ID / MRN, age in words ("54 y", "8 mo"), sex (M, F, O or "")."""

    name: str
    patient_id: str
    age: str
    sex: str


def _age_from_dates(birth: str, on: str) -> str:
    try:
        born = date(int(birth[:4]), int(birth[4:6]), int(birth[6:8]))
        then = date(int(on[:4]), int(on[4:6]), int(on[6:8]))
    except (ValueError, IndexError):
        return ""
    months = (then.year - born.year) * 12 + then.month - born.month - (then.day < born.day)
    if months < 0:
        return ""
    return f"{months // 12} y" if months >= 24 else f"{months} mo"


def _age_text(age: str) -> str:
    """DICOM AS ("054Y", "008M", "012W", "003D") in words."""
    age = age.strip().upper()
    if len(age) != 4 or not age[:3].isdigit() or age[3] not in "DWMY":
        return age
    return f"{int(age[:3])} {dict(D='d', W='wk', M='mo', Y='y')[age[3]]}"


def _name(value: object) -> str:
    if not value:
        return ""
    person = value if isinstance(value, PersonName) else PersonName(str(value))
    parts = [person.family_name, person.given_name]
    text = ", ".join(p for p in parts if p)
    return text or str(value).replace("^", " ").strip()


def read_identity(source: InstanceSource, key: str) -> PatientIdentity | None:
    """The identity in the instance stored under `key`, or None when it cannot be read (logged without it)."""
    try:
        with source.open(key) as handle:
            ds = dcmread(handle, stop_before_pixels=True, specific_tags=_IDENTITY_TAGS, force=True)
    except Exception as exc:  # noqa: BLE001 - a page shows "-" rather than failing for one unreadable file
        log.warning("patient identity not readable from %s: %s", key, type(exc).__name__)
        return None
    age = _age_text(str(ds.get("PatientAge", "") or ""))
    if not age:
        age = _age_from_dates(str(ds.get("PatientBirthDate", "") or ""), str(ds.get("StudyDate", "") or ""))
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    return PatientIdentity(
        name=_name(ds.get("PatientName", "")),
        patient_id=str(ds.get("PatientID", "") or "").strip(),
        age=age,
        sex=sex if sex in ("M", "F", "O") else "",
    )
