"""The local validation's figures against hand computation: Se/Sp, AUC, PPV/NPV at a prevalence, operating points,
calibration, subgroups and worst errors; and the report the evaluation writes (HTML, plots, gallery)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from triage.config import Settings
from triage.models.registry import ModelRegistry
from triage.training import validation_report as vr
from triage.training.evaluate import binary_metrics, bootstrap_intervals, evaluate
from triage.training.synth_xray import generate_dataset

# 10 cases: 4 positives, 6 negatives. Flagged at 0.5: positives 0.9, 0.8, 0.6 (TP 3, FN 1 at 0.3);
# negatives 0.7 (FP 1), 0.4, 0.2, 0.1, 0.05, 0.01 (TN 5).
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
P = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.05, 0.01])


def test_sensitivity_specificity_and_auc_by_hand() -> None:
    metrics = binary_metrics(Y, P, 0.5)
    assert metrics["sensitivity"] == 3 / 4 and metrics["specificity"] == 5 / 6
    # AUC by hand: of the 24 positive-negative pairs, the positive ranks higher in all but: 0.6<0.7, 0.3<0.7,
    # 0.3<0.4 -> 21/24.
    assert metrics["roc_auc"] == pytest.approx(21 / 24)
    assert vr.se_sp(Y, P, 0.5) == (0.75, 5 / 6)


def test_bootstrap_intervals_bracket_the_estimates() -> None:
    rng = np.random.default_rng(1)
    y = np.array([1] * 60 + [0] * 140)
    p = np.clip(np.where(y == 1, rng.normal(0.75, 0.15, 200), rng.normal(0.3, 0.15, 200)), 0, 1)
    metrics = binary_metrics(y, p, 0.5)
    intervals = bootstrap_intervals(y, p, 0.5, 400, seed=0)
    for key in ("roc_auc", "sensitivity", "specificity"):
        low, high = intervals[key]
        assert low <= metrics[key] <= high and high - low < 0.25


def test_predictive_values_at_a_prevalence_by_hand() -> None:
    # Se 0.9, Sp 0.95 at 2% prevalence: PPV = 0.018 / (0.018 + 0.049) = 0.2687; NPV = 0.931 / (0.931 + 0.002).
    ppv, npv = vr.predictive_values(0.9, 0.95, 0.02)
    assert ppv == pytest.approx(0.018 / 0.067) and npv == pytest.approx(0.931 / 0.933)
    assert vr.predictive_values(None, 0.9, 0.1) == (None, None)


def test_threshold_for_a_target_sensitivity_is_the_highest_that_holds_it() -> None:
    assert vr.threshold_for_sensitivity(Y, P, 0.75) == 0.6  # 3 of 4 positives at >= 0.6
    assert vr.threshold_for_sensitivity(Y, P, 0.80) == 0.3  # 4 of 4 needed: down to 0.3
    assert vr.threshold_for_sensitivity(Y, P, 0.50) == 0.8
    rows = vr.operating_points(Y, P, 0.1, 50, 0, [("card threshold", 0.5)])
    assert [r["name"] for r in rows][:2] == ["card threshold", "sensitivity >= 0.80"]
    assert rows[1]["threshold"] == 0.3 and rows[1]["sensitivity"] == 1.0 and rows[1]["specificity"] == 4 / 6
    assert rows[0]["flag_rate"] == 0.4


def test_calibration_table_and_error_by_hand() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([0.05, 0.15, 0.85, 0.95])
    table = vr.calibration(y, p)
    assert [(b["n"], b["observed"]) for b in table["bins"]] == [(1, 0.0), (1, 0.0), (1, 1.0), (1, 1.0)]
    # |0.05-0| + |0.15-0| + |0.85-1| + |0.95-1|, each weighted 1/4.
    assert table["expected_calibration_error"] == pytest.approx((0.05 + 0.15 + 0.15 + 0.05) / 4)


def test_subgroups_split_by_header_and_leave_out_uniform_ones() -> None:
    headers = [
        {"Manufacturer": "GE" if i < 5 else "Siemens", "PatientAgeYears": 70.0, "ViewPosition": "PA"} for i in range(10)
    ]
    groups = vr.subgroups(Y, P, headers, 0.5, n_bootstrap=20)
    assert list(groups) == ["manufacturer"]  # view and age band are the same for all: left out
    ge, siemens = groups["manufacturer"]
    assert (ge["value"], ge["n"], ge["n_positive"], ge["sensitivity"], ge["specificity"]) == ("GE", 5, 4, 0.75, 0.0)
    assert (siemens["n"], siemens["n_positive"], siemens["specificity"]) == (5, 0, 1.0)


def test_worst_errors_are_the_most_confident_mistakes() -> None:
    ids = [f"c{i}" for i in range(10)]
    worst = vr.worst_errors(ids, Y, P, 0.5)
    assert [(w["kind"], w["case"]) for w in worst] == [("false positive", "c4"), ("false negative", "c3")]


def test_evaluation_writes_the_html_report_with_plots_gallery_and_operating_points(tmp_path: Path) -> None:
    model = ModelRegistry(Settings().weights_dir).get("xr-chest-pneumothorax")
    data = tmp_path / "site"
    generate_dataset(data, 24, 0.5, seed=21, fmt="dicom", institution="North")
    out = tmp_path / "report"
    report = evaluate(model, data, data / "labels.csv", out, ["CPUExecutionProvider"], n_bootstrap=50, site="North",
                      prevalence=0.05)  # fmt: skip
    assert report["site"] == "North" and report["prevalence"] == 0.05
    assert json.loads((out / "report.json").read_text())["operating_points"] == json.loads(
        json.dumps(report["operating_points"])
    )
    se, sp = report["sensitivity"], report["specificity"]
    assert report["ppv"] == pytest.approx(vr.predictive_values(se, sp, 0.05)[0])
    page = (out / "report.html").read_text()
    for part in ("Operating points", "sensitivity &gt;= 0.95", "Synthetic demonstration model", "Site: <strong>North"):
        assert part in page
    assert (out / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    for row in report["worst_errors"]:
        assert row["thumbnail"] and (out / row["thumbnail"]).is_file()
        assert row["thumbnail"] in page
