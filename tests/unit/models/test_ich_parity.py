"""ct-head-ich: the shipped ONNX members are the card's files, and member 1 equals torch eager on a real CT tile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from triage.config import REPO_ROOT
from triage.domain import SeriesInfo
from triage.models.registry import ModelRegistry, sha256_file
from triage.models.runtime import OnnxModel, available_providers

onnx = pytest.importorskip("onnx", reason="reading the graphs needs onnx (pip install 'triage[train]')")

HEAD_CT_DIRS = (REPO_ROOT / "tests" / "data" / "ct-head-ge", Path("/work/shared/data/ct-head-ge"))
SOURCE = REPO_ROOT / "weights-src" / "blast-ct-v1"


@pytest.fixture(scope="module")
def installed():
    return ModelRegistry(REPO_ROOT / "weights").get("ct-head-ich")


def test_shipped_files_match_the_card(installed) -> None:
    card = installed.card
    assert len(card.weights) == card.ensemble.members == 12
    for spec, path in zip(card.weights, installed.weight_paths(), strict=True):
        assert sha256_file(path) == spec.sha256, path.name
        assert path.stat().st_size < 20 * 1024 * 1024
        graph = onnx.load(str(path), load_external_data=False)
        assert not [t.name for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        (inp,), (out,) = graph.graph.input, graph.graph.output
        assert inp.name == card.inputs.tensor.name and out.name == card.outputs.tensor.name
        assert [d.dim_value for d in inp.type.tensor_type.shape.dim] == card.inputs.tensor.shape
        assert [d.dim_value for d in out.type.tensor_type.shape.dim] == card.outputs.tensor.shape
    installed.verify()


def test_source_state_dicts_match_their_checksums() -> None:
    sums = dict(line.split()[::-1] for line in (SOURCE / "SHA256SUMS").read_text().splitlines() if line.strip())
    assert len(sums) == 12
    for name, digest in sums.items():
        assert sha256_file(SOURCE / name) == digest, name


@pytest.fixture(scope="module")
def real_tile(installed) -> np.ndarray:
    return _real_tile(installed, installed.card.inputs.tensor.shape[-1])


def _real_tile(installed, edge: int) -> np.ndarray:
    series_dir = next((d for d in HEAD_CT_DIRS if d.is_dir()), None)
    if series_dir is None:
        pytest.skip(f"no real head CT in {[str(d) for d in HEAD_CT_DIRS]}")
    from triage.pipelines.ich import IchPipeline

    files = tuple(sorted(str(p) for p in series_dir.glob("*.dcm")))
    volume = IchPipeline(installed.card).preprocess(SeriesInfo("parity", "CT", "", len(files), files))
    tile = np.full((1, 1, edge, edge, edge), -1.0, dtype=np.float32)
    z, y, x = (max(0, (s - edge) // 2) for s in volume.image.shape)
    crop = volume.image[z : z + edge, y : y + edge, x : x + edge]
    tile[0, 0, : crop.shape[0], : crop.shape[1], : crop.shape[2]] = crop
    # A real tile spans air, bone and brain: the window's whole range.
    assert tile.min() == -1.0 and tile.max() == 1.0
    return tile


def test_onnx_equals_torch_eager_on_a_real_tile(installed, real_tile: np.ndarray) -> None:
    pytest.importorskip("blast_ct", reason="torch eager parity needs pip install 'triage[train]'")
    import torch

    from triage.training.export_ich import load_deepmedic, probability_network

    card = installed.card
    tolerance = float(card.postprocessing["onnx_parity_tolerance"])
    tile = real_tile
    net = probability_network(load_deepmedic(SOURCE / "model_1.pt"))
    with torch.inference_mode():
        expected = net(torch.from_numpy(tile)).numpy()
    assert expected.shape == tuple(card.outputs.tensor.shape)
    for provider in available_providers(["OpenVINOExecutionProvider", "CPUExecutionProvider"]):
        member = OnnxModel.load(installed.weight_paths()[0], [provider])
        got = member.run(tile)
        diff = float(np.max(np.abs(got - expected)))
        assert diff <= tolerance, f"{provider}: max |onnx - torch| = {diff:.2e} > {tolerance:.0e}"
        # Probabilities: each voxel's classes sum to one, so the graph really ends in the softmax the card says.
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_reexport_reproduces_the_shipped_member(installed, real_tile: np.ndarray, tmp_path: Path) -> None:
    """A fresh clone can rebuild the weights: re-exporting member 1 gives the same outputs (files differ in bytes)."""
    pytest.importorskip("blast_ct", reason="export needs pip install 'triage[train]'")
    from triage.training.export_ich import export_member

    edge = installed.card.inputs.tensor.shape[-1]
    rebuilt = export_member(SOURCE / "model_1.pt", tmp_path / "member_01.onnx", edge)
    shipped = OnnxModel.load(installed.weight_paths()[0], ["CPUExecutionProvider"]).run(real_tile)
    again = OnnxModel.load(rebuilt, ["CPUExecutionProvider"]).run(real_tile)
    assert float(np.max(np.abs(shipped - again))) <= float(installed.card.postprocessing["onnx_parity_tolerance"])
