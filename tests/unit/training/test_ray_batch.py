"""Batch evaluation with Ray Data (a real local Ray instance) gives the same report as scoring in process."""

from __future__ import annotations

from pathlib import Path

import pytest

from triage.config import Settings
from triage.models.registry import ModelRegistry
from triage.training.evaluate import RayBatch, evaluate
from triage.training.synth_xray import generate_dataset

pytestmark = pytest.mark.slow


def test_ray_data_scores_every_case_as_the_process_does(tmp_path: Path) -> None:
    model = ModelRegistry(Settings().weights_dir).get("xr-chest-pneumothorax")
    data = tmp_path / "site"
    generate_dataset(data, 16, 0.5, seed=31, fmt="dicom")
    (data / "broken.dcm").write_bytes(b"not dicom")
    with (data / "labels.csv").open("a") as handle:
        handle.write("broken.dcm,1\n")
    here = evaluate(model, data, None, tmp_path / "here", ["CPUExecutionProvider"], n_bootstrap=50)
    on_ray = evaluate(model, data, None, tmp_path / "ray", ["CPUExecutionProvider"], n_bootstrap=50, ray=RayBatch())
    assert on_ray["scored_with"].startswith("Ray Data (1 actor(s)") and here["scored_with"] == "in process"
    for key in ("n", "n_positive", "n_failed", "roc_auc", "sensitivity", "specificity", "confusion_matrix"):
        assert on_ray[key] == here[key], key
    assert on_ray["failures"][0]["case"] == "broken.dcm"
    here_p = (tmp_path / "here" / "predictions.csv").read_text()
    assert (tmp_path / "ray" / "predictions.csv").read_text() == here_p
