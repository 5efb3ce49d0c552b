"""Retraining from feedback, end to end on small generated data: studies analysed by the service, radiologists'
feedback, `triage models labels` -> `triage train` -> export as a new version -> it starts in shadow ->
`triage models evaluate --site` -> the gate refuses a set too small to validate it."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from triage.cli import app
from triage.config import Settings
from triage.domain import utcnow
from triage.models.registry import ModelRegistry
from triage.models.states import ModelState
from triage.serve.service import TriageService
from triage.training.evaluate import evaluate
from triage.training.export_xray import export
from triage.training.synth_xray import generate_dataset
from triage.training.train_xray import train
from triage.worklist.accounts import Accounts
from triage.worklist.model_states import ValidationRefused

pytestmark = pytest.mark.slow
XR = "xr-chest-pneumothorax"


def test_feedback_becomes_a_new_version_in_shadow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "weights"
    shutil.copytree(Settings().weights_dir / XR, weights / XR)
    settings = Settings(data_dir=tmp_path / "data", weights_dir=weights)
    service = TriageService(settings, runner_kind="inprocess", start_scp=False)
    service.start()
    try:
        films = tmp_path / "films"
        labels = generate_dataset(films, 16, 0.5, seed=41, fmt="dicom", institution="North")
        truth = {row["image"]: int(row["label"]) for row in csv.DictReader(labels.open())}
        accounts = Accounts(service.worklist.engine)
        for name, label in truth.items():
            ds = pydicom.dcmread(films / name)
            service.accept(ds, "XR_ROOM")
            outcome = service._analyse(str(ds.StudyInstanceUID))
            (finding,) = outcome.findings
            assert finding.shadow  # the synthetic model: shadow at North
            verdict = "agree" if finding.flagged == bool(label) else "disagree"
            accounts.add_feedback("reader", str(ds.StudyInstanceUID), "pneumothorax", verdict, utcnow(),
                                  series_uid=finding.series_uid, ai_flagged=finding.flagged,
                                  ai_probability=finding.probability, model=XR, model_version="1.0.0")  # fmt: skip
    finally:
        service.stop()

    monkeypatch.setenv("TRIAGE_WEIGHTS_DIR", str(weights))
    exported = tmp_path / "feedback.csv"
    result = CliRunner().invoke(
        app, ["models", "labels", XR, "--out", str(exported), "--data-dir", str(settings.data_dir)]
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(exported.open()))
    assert len(rows) == 16 and {int(r["label"]) for r in rows} == {0, 1}
    # The radiologists' labels are the truth the films were generated with.
    by_key = {r["image"]: int(r["label"]) for r in rows}
    assert sorted(by_key.values()) == sorted(truth.values())

    run = tmp_path / "run"
    train(settings.store_dir, exported, run, epochs=1, batch_size=8, preprocessing={"image_size": [64, 64]})
    export(
        run, weights, "1.1.0", training_command="triage train xr-chest-pneumothorax --data ... --labels feedback.csv"
    )
    registry = ModelRegistry(weights)
    assert registry.get(XR).card.version == "1.1.0"

    # Installed, the new version starts in shadow everywhere, for this reason.
    from triage.worklist.db import create_engine_for
    from triage.worklist.model_states import ModelStates

    states = ModelStates(create_engine_for(settings.resolved_database_url), registry, settings.models)
    state = states.states("North")[XR]
    assert (state.version, state.state) == ("1.1.0", ModelState.SHADOW)

    report = evaluate(registry.get(XR), settings.store_dir, exported, tmp_path / "eval", ["CPUExecutionProvider"],
                      n_bootstrap=50, site="North")  # fmt: skip
    assert report["n"] == 16 and report["site"] == "North" and report["version"] == "1.1.0"
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["n_positive"] == 8
    with pytest.raises(ValidationRefused, match="16 cases, the site asks for at least 100"):
        states.promote(XR, "North", report, "ml", utcnow())
