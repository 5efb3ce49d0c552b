"""Routing rules decide which model analyses which series, and record why the others are skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from triage.config import Settings
from triage.domain import SeriesInfo
from triage.errors import TriageError
from triage.models.registry import ModelRegistry
from triage.pipelines.routing import RoutingRules, route_study

CT = "1.2.840.10008.5.1.4.1.1.2"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
RDSR = "1.2.840.10008.5.1.4.1.1.88.67"
MODELS = {"ct-head-ich", "xr-chest-pneumothorax"}


@pytest.fixture(scope="module")
def rules() -> RoutingRules:
    return RoutingRules.load(Settings().routing_rules)


def series(uid: str, modality: str = "CT", sop: str = CT, n: int = 30, **attrs: object) -> SeriesInfo:
    base: dict[str, object] = {
        "BodyPartExamined": "HEAD",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "ConvolutionKernel": "STANDARD",
        "SliceThickness": 5.0,
    }
    base.update(attrs)
    return SeriesInfo(uid, modality, sop, n, (), base)


def test_head_ct_routes_to_ich_and_scout_dose_sc_bone_are_skipped(rules: RoutingRules) -> None:
    study = [
        series("scout", n=2, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]),
        series("axial"),
        series("bone", ConvolutionKernel="BONE"),
        series("sc", sop=SC),
        series("dose", modality="SR", sop=RDSR),
    ]
    decisions = {d.series_uid: d for d in route_study(study, rules, MODELS)}
    assert decisions["axial"].model == "ct-head-ich"
    assert decisions["scout"].model is None and decisions["scout"].reason == "localizer"
    assert decisions["bone"].reason == "bone-kernel"
    assert decisions["sc"].reason == "secondary-capture"
    assert decisions["dose"].reason == "dose-report"


def test_one_series_per_model_prefers_the_thinnest(rules: RoutingRules) -> None:
    study = [series("thick", SliceThickness=5.0), series("thin", SliceThickness=1.25)]
    decisions = {d.series_uid: d for d in route_study(study, rules, MODELS)}
    assert decisions["thin"].model == "ct-head-ich"
    assert decisions["thick"].model is None
    assert "thin" in decisions["thick"].reason


def test_slice_thickness_outside_limits_is_not_analysed_and_says_why(rules: RoutingRules) -> None:
    (decision,) = route_study([series("thick", SliceThickness=10.0)], rules, MODELS)
    assert decision.model is None
    assert "slice thickness 10.0 mm" in decision.reason


@pytest.mark.parametrize(("view", "routed"), [("PA", True), ("AP", True), ("", True), ("LL", False)])
def test_chest_radiograph_frontal_views(rules: RoutingRules, view: str, routed: bool) -> None:
    # The view is the card's to check (its intended use), not the routing file's.
    card = ModelRegistry(Settings().weights_dir).get("xr-chest-pneumothorax").card
    dx = series("dx", modality="DX", sop=DX, n=1, BodyPartExamined="CHEST", ViewPosition=view)
    (decision,) = route_study([dx], rules, MODELS, admit=lambda model, s: card.check_use(s.attributes))
    assert (decision.model == "xr-chest-pneumothorax") is routed
    if not routed:
        assert decision.reason == (
            "outside-intended-use: outside the model's intended use: view left lateral, model is for PA, AP views"
        )


def test_a_film_outside_intended_use_does_not_displace_one_within_it(rules: RoutingRules) -> None:
    card = ModelRegistry(Settings().weights_dir).get("xr-chest-pneumothorax").card
    lateral = series("lat", modality="DX", sop=DX, n=1, BodyPartExamined="CHEST", ViewPosition="LL")
    frontal = series("pa", modality="DX", sop=DX, n=1, BodyPartExamined="CHEST", ViewPosition="PA")
    decisions = route_study([lateral, frontal], rules, MODELS, admit=lambda model, s: card.check_use(s.attributes))
    assert [d.model for d in decisions] == [None, "xr-chest-pneumothorax"]


def test_modality_no_model_handles_is_recorded(rules: RoutingRules) -> None:
    (decision,) = route_study([series("mr", modality="MR", sop="1.2.840.10008.5.1.4.1.1.4")], rules, MODELS)
    assert decision.model is None
    assert decision.reason.startswith("no model for MR:")
    # What the worklist shows of it: the text before the first colon (triage.analysis.summarise).
    assert decision.reason.split(":")[0] == "no model for MR"


def test_modality_with_a_rule_that_does_not_match_keeps_the_rules_reasons(rules: RoutingRules) -> None:
    dx = series("dx", modality="DX", sop=DX, n=1, BodyPartExamined="ABDOMEN")
    (decision,) = route_study([dx], rules, MODELS)
    assert decision.reason.startswith("no-rule-matched")


def test_model_not_installed_is_recorded(rules: RoutingRules) -> None:
    (decision,) = route_study([series("axial")], rules, {"xr-chest-pneumothorax"})
    assert decision.model is None
    assert "ct-head-ich is not installed" in decision.reason


def test_rules_are_configuration(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - name: any-ct\n    model: ct-head-ich\n    match:\n      modality: [CT]\n")
    (decision,) = route_study([series("x", BodyPartExamined="ABDOMEN")], RoutingRules.load(path), MODELS)
    assert decision.model == "ct-head-ich"


def test_unknown_match_key_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - name: r\n    model: m\n    match:\n      modalty: [CT]\n")
    with pytest.raises(TriageError, match="modalty"):
        RoutingRules.load(path)
