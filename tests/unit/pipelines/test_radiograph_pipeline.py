"""Chest radiograph pipeline: preprocessing geometry, heatmap mapped back onto the image, and findings from the
shipped synthetic model run through ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

from triage.config import REPO_ROOT
from triage.dicom.radiograph import Radiograph
from triage.domain import SeriesInfo
from triage.errors import InferenceError
from triage.models.registry import ModelRegistry
from triage.models.runtime import load_members
from triage.pipelines.base import pipeline_for
from triage.pipelines.radiograph import (
    ChestRadiographPipeline,
    PreparedRadiograph,
    RadiographPreprocess,
    heatmap_overlay,
    preprocessing_params,
)
from triage.training.synth_xray import make_chest_radiograph_dataset


def _radiograph(pixels: np.ndarray) -> Radiograph:
    return Radiograph(pixels.astype(np.float32), "1.2.3", pixels.shape[0], pixels.shape[1], None, "PA", "MONOCHROME2")


@pytest.fixture(scope="module")
def installed():
    return ModelRegistry(REPO_ROOT / "weights").get("xr-chest-pneumothorax")


@pytest.fixture(scope="module")
def members(installed):
    return load_members(installed, ["CPUExecutionProvider"])


def test_preprocessing_pads_the_short_side_symmetrically_then_resizes_and_normalises() -> None:
    pixels = np.zeros((200, 100), dtype=np.float32)
    pixels[:, :50] = 1.0  # left half of the image bright
    image, pad_before, canvas = RadiographPreprocess({"image_size": [64, 64]})(_radiograph(pixels))
    assert image.shape == (1, 64, 64) and image.dtype == np.float32
    assert pad_before == (0, 50) and canvas == 200
    assert abs(float(image.mean())) < 1e-5 and abs(float(image.std()) - 1) < 1e-3
    row = image[0, 32]
    # Canvas columns 0-49 padding, 50-99 bright, 100-199 dark+padding: 64 px -> 16 | 16 | 32.
    assert row[:15].max() < 0 and row[17:31].min() > 0 and row[33:].max() < 0


def test_unknown_preprocessing_key_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="'sharpen'"):
        preprocessing_params({"sharpen": True})
    with pytest.raises(ValueError, match="keep_aspect='crop'"):
        preprocessing_params({"keep_aspect": "crop"})


def test_heatmap_is_mapped_back_onto_the_radiograph_grid() -> None:
    prepared = PreparedRadiograph(
        image=np.zeros((1, 64, 64), np.float32),
        sop_instance_uid="1.2.3",
        rows=1000,
        cols=600,
        pad_before=(0, 200),
        canvas=1000,
        view_position="PA",
        selection="",
    )
    heatmap = np.full((8, 8), -8.0, dtype=np.float32)
    heatmap[0:2, 2:4] = 8.0  # top of the image, left part of the (unpadded) image
    overlay = heatmap_overlay(prepared, heatmap, max_px=250)
    assert overlay.stride == 4 and overlay.kind == "heatmap" and overlay.sop_instance_uid == "1.2.3"
    assert overlay.mask.shape == (250, 150) and overlay.mask.dtype == np.float32
    assert overlay.mask.min() >= 0.0 and overlay.mask.max() <= 1.0
    # The hot cells cover canvas columns 250-500 = image columns 50-300 = overlay columns 12-75, rows 0-62.
    assert overlay.mask[10:50, 20:65].mean() > 0.9
    assert overlay.mask[150:, :].max() < 0.1 and overlay.mask[:, 100:].max() < 0.1


def test_card_names_this_pipeline(installed) -> None:
    pipeline = pipeline_for(installed.card)
    assert isinstance(pipeline, ChestRadiographPipeline)
    assert installed.card.synthetic is True


def test_findings_from_a_dicom_series_are_marked_synthetic(installed, members, tmp_path) -> None:
    pipeline = pipeline_for(installed.card)
    lateral = make_chest_radiograph_dataset(11, True, (300, 240), view="LL", photometric="MONOCHROME1")
    frontal = make_chest_radiograph_dataset(
        11, True, (300, 240), view="PA", photometric="MONOCHROME1", series_uid=lateral.SeriesInstanceUID
    )
    frontal.InstanceNumber = 2
    files = []
    for name, ds in (("1.dcm", lateral), ("2.dcm", frontal)):
        ds.save_as(tmp_path / name, enforce_file_format=True)
        files.append(str(tmp_path / name))
    series = SeriesInfo(frontal.SeriesInstanceUID, "DX", frontal.SOPClassUID, 2, tuple(files))
    prepared = pipeline.preprocess(series)
    raw = pipeline.infer(prepared, members)
    (finding,) = pipeline.postprocess(prepared, raw, series)
    assert finding.label == "pneumothorax" and finding.synthetic is True
    assert finding.model == "xr-chest-pneumothorax" and finding.model_version == installed.card.version
    assert finding.series_uid == frontal.SeriesInstanceUID
    assert finding.flagged == (finding.probability >= installed.card.findings[0].threshold)
    assert "not validated" in finding.details["synthetic_model_notice"]
    assert finding.details["view"] == "PA" and finding.details["image"] == frontal.SOPInstanceUID
    assert "first PA image" in finding.details["image_selection"]
    assert finding.overlay is not None and finding.overlay.sop_instance_uid == frontal.SOPInstanceUID
    assert finding.overlay.mask.shape == (-(-300 // finding.overlay.stride), -(-240 // finding.overlay.stride))
    assert finding.model_dump(mode="json")["synthetic"] is True


def test_the_model_separates_clear_cases(installed, members, tmp_path) -> None:
    """A behaviour check on a few generated studies (not an evaluation: see triage models evaluate)."""
    pipeline = pipeline_for(installed.card)
    scores = {}
    for label in (0, 1):
        values = []
        for seed in range(4):
            ds = make_chest_radiograph_dataset(9000 + seed, bool(label), (256, 256))
            path = tmp_path / f"{label}-{seed}.dcm"
            ds.save_as(path, enforce_file_format=True)
            series = SeriesInfo(ds.SeriesInstanceUID, "DX", ds.SOPClassUID, 1, (str(path),))
            prepared = pipeline.preprocess(series)
            values.append(pipeline.postprocess(prepared, pipeline.infer(prepared, members), series)[0].probability)
        scores[label] = np.mean(values)
    assert scores[1] > scores[0]


def test_infer_without_members_is_an_inference_error(installed) -> None:
    pipeline = pipeline_for(installed.card)
    prepared = pipeline.prepare_radiograph(_radiograph(np.random.default_rng(0).random((64, 64))))
    with pytest.raises(InferenceError, match="no loaded model members"):
        pipeline.infer(prepared, [])
