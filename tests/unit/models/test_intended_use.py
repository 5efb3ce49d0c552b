"""Intended use from the card, checked on each series' header: refusals in words, assumptions for missing values."""

from __future__ import annotations

import pytest

from triage.config import Settings
from triage.dicom.series import patient_age_years
from triage.models.intended_use import IntendedUse, Range, check_intended_use
from triage.models.registry import ModelRegistry


@pytest.fixture(scope="module")
def xray_card():
    return ModelRegistry(Settings().weights_dir).get("xr-chest-pneumothorax").card


@pytest.fixture(scope="module")
def ct_card():
    return ModelRegistry(Settings().weights_dir).get("ct-head-ich").card


ADULT_PA = {"Modality": "DX", "BodyPartExamined": "CHEST", "ViewPosition": "PA", "PatientAgeYears": 45.0}


def test_an_adult_frontal_chest_film_is_within_intended_use(xray_card):
    check = xray_card.check_use(ADULT_PA)
    assert check.ok and check.assumptions == []


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"PatientAgeYears": 6.0}, "patient age 6 y, model is for adults (18 y and over)"),
        ({"PatientAgeYears": 0.5}, "patient age 6 months, model is for adults (18 y and over)"),
        ({"ViewPosition": "LL"}, "view left lateral, model is for PA, AP views"),
        ({"BodyPartExamined": "ABDOMEN"}, "body part ABDOMEN, model is for CHEST, THORAX, LUNG"),
        ({"Modality": "MR"}, "modality MR, model is for CR, DX"),
    ],
)
def test_a_film_outside_intended_use_is_refused_with_the_reason_in_words(xray_card, changes, reason):
    check = xray_card.check_use({**ADULT_PA, **changes})
    assert not check.ok
    assert check.text() == f"outside the model's intended use: {reason}"


def test_missing_attributes_are_allowed_as_the_card_says_and_the_choice_is_recorded(xray_card):
    check = xray_card.check_use({"Modality": "CR"})
    assert check.ok
    assert check.assumptions == [
        "body part not in the header: analysed, as the card allows",
        "view position not in the header: analysed, as the card allows",
        "patient age not in the header: analysed, as the card allows",
    ]


def test_a_card_may_refuse_a_missing_attribute():
    use = IntendedUse(age_years=Range(min=18), when_missing={"age": "refuse"})
    check = check_intended_use(["DX"], [], use, {"Modality": "DX"})
    assert check.refusals == ["patient age not in the header, which the model requires"]


@pytest.mark.parametrize(("thickness", "ok"), [(0.4, False), (0.5, True), (5.0, True), (7.5, True), (10.0, False)])
def test_ct_slice_thickness_range(ct_card, thickness, ok):
    check = ct_card.check_use({"Modality": "CT", "BodyPartExamined": "HEAD", "SliceThickness": thickness})
    assert check.ok is ok
    if not ok:
        assert f"slice thickness {thickness:g} mm, model is for 0.5-7.5 mm" in check.text()


@pytest.mark.parametrize(
    ("age", "birth", "study", "years", "source"),
    [
        ("045Y", None, None, 45.0, "Patient's Age"),
        ("006M", None, None, 0.5, "Patient's Age"),
        ("010W", None, None, 10 / 52.18, "Patient's Age"),
        ("", "20180310", "20240309", 5.999, "birth date and study date"),
        (None, "2018", "20240309", None, ""),
        ("garbage", None, None, None, ""),
        (None, "20250101", "20240101", None, ""),  # born after the study: not an age
    ],
)
def test_patient_age_from_the_age_attribute_or_the_dates(age, birth, study, years, source):
    got, came_from = patient_age_years(age, birth, study)
    assert came_from == source
    assert got == pytest.approx(years, abs=0.01) if years is not None else got is None
