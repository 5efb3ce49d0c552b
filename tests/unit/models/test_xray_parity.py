"""xr-chest-pneumothorax: the shipped ONNX graph equals the shipped torch weights on a real preprocessed input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from triage.config import REPO_ROOT
from triage.models.registry import ModelRegistry, sha256_file
from triage.models.runtime import OnnxModel, available_providers
from triage.models.xray_net import build_xray_net
from triage.training.export_xray import parity_input


@pytest.fixture(scope="module")
def installed():
    return ModelRegistry(REPO_ROOT / "weights").get("xr-chest-pneumothorax")


@pytest.fixture(scope="module")
def torch_net(installed):
    card = installed.card
    torch_file = card.provenance["torch_weights"]
    path = installed.directory / torch_file["file"]
    assert sha256_file(path) == torch_file["sha256"]
    net = build_xray_net(card)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


def test_shipped_weights_match_the_card_and_are_small(installed) -> None:
    installed.verify()
    for path in installed.weight_paths():
        assert path.stat().st_size < 2 * 1024 * 1024
    assert installed.card.synthetic is True


@pytest.mark.parametrize("providers", [["CPUExecutionProvider"], ["OpenVINOExecutionProvider"]])
def test_onnx_matches_torch_within_the_card_tolerance(installed, torch_net, providers) -> None:
    card = installed.card
    chosen = available_providers(providers)
    if providers[0] not in chosen:
        pytest.skip(f"{providers[0]} is not offered by this onnxruntime")
    batch = parity_input(card.inputs.preprocessing)
    assert list(batch.shape[1:]) == card.inputs.tensor.shape[1:]
    with torch.no_grad():
        logit_t, heatmap_t = (t.numpy() for t in torch_net(torch.from_numpy(batch)))
    outputs = OnnxModel.load(installed.weight_paths()[0], chosen).run_all(batch)
    tolerance = card.provenance["parity"]["tolerance"]
    # OpenVINO may run convolutions at lower internal precision; its tolerance is 100x the CPU provider's.
    scale = 1.0 if providers == ["CPUExecutionProvider"] else 100.0
    assert list(outputs["heatmap"].shape[1:]) == card.postprocessing["heatmap_shape"][1:]
    np.testing.assert_allclose(outputs["logit"], logit_t, rtol=0, atol=tolerance["logit"] * scale)
    np.testing.assert_allclose(outputs["heatmap"], heatmap_t, rtol=0, atol=tolerance["heatmap"] * scale)
    # The logit is the card's pooling of the class activation map, in ONNX as in torch.
    network = card.provenance["network"]
    cam = outputs["heatmap"].astype(np.float64).ravel()
    if network["pooling"] == "lse":
        r = float(network["lse_r"])
        pooled = (np.log(np.mean(np.exp(r * (cam - cam.max())))) + r * cam.max()) / r
    else:
        pooled = cam.mean()
    np.testing.assert_allclose(outputs["logit"][0, 0], pooled, atol=1e-4)
