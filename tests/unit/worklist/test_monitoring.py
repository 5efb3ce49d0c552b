"""Models on live traffic: flag rate per site, shadow agreement with the active model and with radiologists, and
drift alerts when the flag rate of a generated stream jumps or its inputs shift."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from triage.domain import AIStatus, InstanceMeta
from triage.worklist.accounts import Accounts
from triage.worklist.monitoring import activity, drift, expected_band, psi, windows
from triage.worklist.repository import Worklist

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
XR, CT = "xr-chest-pneumothorax", "ct-head-ich"


def finding(model: str, flagged: bool, shadow: bool = False, version: str = "1.0.0", manufacturer: str = "GE") -> dict:
    return {
        "label": "pneumothorax", "probability": 0.9 if flagged else 0.1, "flagged": flagged, "model": model,
        "model_version": version, "synthetic": True, "shadow": shadow,
        "details": {"input": {"manufacturer": manufacturer, "view": "PA"}},
    }  # fmt: skip


@pytest.fixture
def worklist() -> Worklist:
    wl = Worklist.open("sqlite://")
    yield wl
    wl.close()


class Stream:
    """Generated studies analysed at chosen times."""

    def __init__(self, worklist: Worklist) -> None:
        self.worklist, self.n = worklist, 0

    def study(self, at: datetime, findings: list[dict], site: str = "North") -> str:
        self.n += 1
        uid = f"1.2.826.0.9.{self.n}"
        meta = InstanceMeta(study_uid=uid, series_uid=f"{uid}.1", sop_instance_uid=f"{uid}.1.1",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", modality="DX", key=f"{uid}/x.dcm",
                            institution=site)  # fmt: skip
        # Received now, so that a running service's scheduler (stable age 1 h in the serve tests) leaves it alone;
        # only when its analysis finished counts here.
        self.worklist.record_instance(meta, datetime.now(UTC))
        generation = self.worklist.begin_analysis(uid, at - timedelta(minutes=1))
        self.worklist.finish_analysis(uid, generation, findings, [], AIStatus.DONE, "analysed", at)
        return uid

    def run(self, start: datetime, end: datetime, n: int, rate: float, seed: int, **kw: object) -> None:
        rng = random.Random(seed)
        step = (end - start) / n
        for i in range(n):
            self.study(start + step * i, [finding(XR, rng.random() < rate, **kw)])  # type: ignore[arg-type]


def test_a_steady_stream_raises_no_alert(worklist: Worklist) -> None:
    stream = Stream(worklist)
    recent, baseline = windows(NOW, 24, 28)
    stream.run(*baseline, 200, 0.10, seed=1)
    stream.run(*recent, 60, 0.10, seed=2)
    now = activity(worklist.engine, *recent)
    assert [(a.model, a.site, a.studies) for a in now] == [(XR, "North", 60)]
    assert drift(now, activity(worklist.engine, *baseline)) == []


def test_a_jump_in_flag_rate_raises_an_alert_against_the_baseline(worklist: Worklist) -> None:
    stream = Stream(worklist)
    recent, baseline = windows(NOW, 24, 28)
    stream.run(*baseline, 200, 0.05, seed=3)
    stream.run(*recent, 60, 0.40, seed=4)
    alerts = drift(activity(worklist.engine, *recent), activity(worklist.engine, *baseline))
    kinds = {a.kind for a in alerts}
    assert "flag-rate" in kinds and "probabilities" in kinds
    (rate,) = [a for a in alerts if a.kind == "flag-rate"]
    assert rate.model == XR and rate.site == "North" and rate.value > rate.expected[1]
    assert "expected" in rate.message and "baseline (200 studies)" in rate.message


def test_the_validation_reports_rate_is_the_expectation_where_there_is_one(worklist: Worklist) -> None:
    stream = Stream(worklist)
    recent, baseline = windows(NOW, 24, 28)
    stream.run(*recent, 60, 0.30, seed=5)  # no baseline at all: only the report says what to expect
    alerts = drift(activity(worklist.engine, *recent), [], {(XR, "1.0.0", "North"): 0.05})
    assert [a.kind for a in alerts] == ["flag-rate"] and "validation report" in alerts[0].message
    assert drift(activity(worklist.engine, *recent), [], {(XR, "1.0.0", "North"): 0.30}) == []


def test_a_new_scanner_mix_is_an_input_shift(worklist: Worklist) -> None:
    stream = Stream(worklist)
    recent, baseline = windows(NOW, 24, 28)
    stream.run(*baseline, 100, 0.1, seed=6, manufacturer="GE")
    stream.run(*recent, 40, 0.1, seed=7, manufacturer="Fujifilm")
    alerts = drift(activity(worklist.engine, *recent), activity(worklist.engine, *baseline))
    assert [a.kind for a in alerts] == ["inputs:manufacturer"] and "Fujifilm" in alerts[0].message


def test_too_few_studies_are_not_judged(worklist: Worklist) -> None:
    stream = Stream(worklist)
    recent, baseline = windows(NOW, 24, 28)
    stream.run(*baseline, 100, 0.05, seed=8)
    stream.run(*recent, 5, 1.0, seed=9)
    assert drift(activity(worklist.engine, *recent), activity(worklist.engine, *baseline)) == []


def test_shadow_agreement_with_the_active_version_and_with_radiologists(worklist: Worklist) -> None:
    stream = Stream(worklist)
    accounts = Accounts(worklist.engine)
    at = NOW - timedelta(hours=1)
    # (active flags, shadow flags, radiologist's truth): agree, agree, disagree, disagree.
    cases = [(True, True, 1), (False, False, 0), (True, False, 1), (False, True, 0)]
    for active, shadowed, truth in cases:
        uid = stream.study(at, [finding(XR, active), finding(XR, shadowed, shadow=True, version="1.1.0")])
        verdict = "agree" if bool(truth) == active else "disagree"
        accounts.add_feedback("reader", uid, "pneumothorax", verdict, at, ai_flagged=active, model=XR)
    (active_row, shadow_row) = [a.to_dict() for a in activity(worklist.engine, NOW - timedelta(hours=2), NOW)]
    assert (active_row["version"], active_row["shadow"]) == ("1.0.0", False)
    assert (shadow_row["version"], shadow_row["shadow"], shadow_row["studies_with_active"]) == ("1.1.0", True, 4)
    assert shadow_row["agreement_with_active"] == 0.5
    assert shadow_row["agreement_with_radiologists"] == 0.5 and active_row["agreement_with_radiologists"] == 1.0
    assert shadow_row["flag_rate"] == 0.5


def test_psi_and_band_by_hand() -> None:
    assert psi([50, 50], [50, 50]) == 0.0
    # (0.8-0.5) ln(0.8/0.5) + (0.2-0.5) ln(0.2/0.5)
    assert psi({"a": 5, "b": 5}, {"a": 8, "b": 2}) == pytest.approx(0.3 * 0.47000363 + 0.3 * 0.91629073, rel=1e-6)
    # 3 standard errors of a proportion: sqrt(0.1 x 0.9 / 100) = 0.03 -> 0.01-0.19.
    assert expected_band(0.1, 100) == pytest.approx((0.01, 0.19))
    assert expected_band(0.02, 10) == pytest.approx((0.0, 0.02 + 3 * (0.02 * 0.98 / 10) ** 0.5))
