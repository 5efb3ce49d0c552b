"""Train for one epoch on a handful of generated images, export to ONNX with a card, and evaluate it through the
service pipeline: every file is written and its numbers agree with each other."""

from __future__ import annotations

import csv
import json

import pytest

from triage.models.card import read_card
from triage.models.registry import ModelRegistry
from triage.training.evaluate import evaluate, record_evaluation
from triage.training.export_xray import export
from triage.training.synth_xray import generate_dataset, write_siim_layout
from triage.training.train_xray import train

TINY = {"image_size": [64, 64]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = tmp_path_factory.mktemp("train")
    generate_dataset(data, 16, 0.5, seed=11, fmt="png", size=96)
    out = tmp_path_factory.mktemp("run")
    record = train(data, None, out, epochs=1, batch_size=8, preprocessing=TINY, data_description="16 tiny images")
    return out, record


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    weights = tmp_path_factory.mktemp("weights")
    card_path = export(trained[0], weights, "0.0.1", training_command="pytest")
    return ModelRegistry(weights).get("xr-chest-pneumothorax"), card_path


def test_training_writes_a_checkpoint_and_its_record(trained) -> None:
    out, record = trained
    assert (out / "model.pt").is_file()
    written = json.loads((out / "training.json").read_text())
    assert written["data"]["n_train"] + written["data"]["n_val"] == 16
    assert len(written["history"]) == 1 and written["preprocessing"]["image_size"] == [64, 64]
    assert 0.0 <= record["operating_threshold"] <= 1.0


def test_siim_layout_trains(tmp_path) -> None:
    write_siim_layout(tmp_path / "siim", 12, seed=5, size=64, positive_fraction=0.5)
    record = train(tmp_path / "siim", None, tmp_path / "run", epochs=1, batch_size=6, siim=True, preprocessing=TINY)
    assert record["data"]["layout"] == "siim-acr" and record["data"]["n_positive"] == 6
    assert (tmp_path / "run" / "model.pt").is_file()


def test_export_writes_a_synthetic_card_the_registry_verifies(exported) -> None:
    installed, card_path = exported
    installed.verify()  # sha256 of model.onnx matches the card
    card = installed.card
    assert card.synthetic is True and "SYNTHETIC" in card.summary and "not validated" in card.notice
    assert card.pipeline == "xr-chest-classifier" and card.inputs.tensor.shape == [None, 1, 64, 64]
    assert card.postprocessing["heatmap_shape"] == [None, 1, 4, 4]
    parity = card.provenance["parity"]
    assert parity["max_abs_diff_logit"] <= parity["tolerance"]["logit"]
    assert (card_path.parent / "model.pt").is_file() and (card_path.parent / "training.json").is_file()


def test_evaluate_writes_consistent_report_roc_and_summary(exported, tmp_path) -> None:
    installed, card_path = exported
    data = tmp_path / "heldout"
    generate_dataset(data, 10, 0.5, seed=12, fmt="dicom", size=96)
    out = tmp_path / "eval"
    report = evaluate(installed, data, data / "labels.csv", out, ["CPUExecutionProvider"], n_bootstrap=50)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cm = report["confusion_matrix"]
    assert report["n"] == 10 == cm["tp"] + cm["fn"] + cm["tn"] + cm["fp"]
    assert report["n_positive"] == cm["tp"] + cm["fn"] == 5
    assert report["sensitivity"] == pytest.approx(cm["tp"] / (cm["tp"] + cm["fn"]))
    assert report["specificity"] == pytest.approx(cm["tn"] / (cm["tn"] + cm["fp"]))
    assert report["synthetic"] is True and report["model"] == "xr-chest-pneumothorax"
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert sum(int(r["flagged"]) and int(r["label"]) for r in rows) == cm["tp"]
    summary = (out / "summary.md").read_text()
    assert "Synthetic demonstration model, not validated" in summary
    assert f"| positive | {cm['tp']} (TP) | {cm['fn']} (FN) |" in summary
    assert f"{report['sensitivity']:.3f}" in summary

    record_evaluation(installed, report)
    card = read_card(card_path)
    names = {f.name for f in card.figures}
    assert {"heldout_roc_auc", "heldout_sensitivity", "heldout_specificity"} <= names
    assert "10 held-out cases" in card.evaluation_data
    installed.verify()  # the card changed, the weights did not


def test_evaluate_reports_cases_it_cannot_read(exported, tmp_path) -> None:
    installed, _ = exported
    generate_dataset(tmp_path, 4, 0.5, seed=13, fmt="png", size=64)
    (tmp_path / "broken.dcm").write_bytes(b"not dicom")
    with (tmp_path / "labels.csv").open("a") as handle:
        handle.write("broken.dcm,1\n")
    report = evaluate(installed, tmp_path, None, tmp_path / "eval", ["CPUExecutionProvider"], n_bootstrap=20)
    assert report["n"] == 4 and report["n_failed"] == 1 and report["failures"][0]["case"] == "broken.dcm"
