"""IchPipeline tiling, skipping, post-processing and overlay, with a tiny real ONNX graph in place of DeepMedic.

The stand-in graph keeps DeepMedic's geometry (input T^3 -> output (T-80)^3, centre-cropped) and labels a voxel
IPH when its scaled value lies in a band, so a correctly tiled volume must reproduce that rule at every voxel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from triage.config import REPO_ROOT
from triage.domain import SeriesInfo
from triage.errors import InferenceError, ModelLoadError
from triage.models.card import ModelCard, read_card
from triage.models.runtime import OnnxModel
from triage.pipelines.base import pipeline_for
from triage.pipelines.ich import (
    HeadVolume,
    IchPipeline,
    IchRaw,
    bleed_mask,
    bleed_probability,
    plan_tiles,
    segment_volume,
)

onnx = pytest.importorskip("onnx", reason="building the stand-in graph needs onnx (pip install 'triage[train]')")
TensorProto, helper = onnx.TensorProto, onnx.helper

CARD_PATH = REPO_ROOT / "weights" / "ct-head-ich" / "1.0.0" / "card.json"
TILE_IN = 90
TILE_OUT = TILE_IN - 80
BAND = (0.2, 0.9)  # scaled values of roughly 54-94 HU in the [-15, 100] window


def _band_graph(
    path: Path, tile_in: int = TILE_IN, classes: int = 5, class_index: int = 1, batch: int | str = 1
) -> Path:
    """ONNX: crop 40 voxels per side, voxel in BAND -> class `class_index` with probability 1, else background.

    `batch` is the graph's batch axis: a fixed size, or a name for a dynamic one."""
    out = tile_in - 80
    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 1, tile_in, tile_in, tile_in])
    outp = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, classes, out, out, out])
    consts = [
        helper.make_tensor("starts", TensorProto.INT64, [3], [40, 40, 40]),
        helper.make_tensor("ends", TensorProto.INT64, [3], [40 + out] * 3),
        helper.make_tensor("axes", TensorProto.INT64, [3], [2, 3, 4]),
        helper.make_tensor("lo", TensorProto.FLOAT, [], [BAND[0]]),
        helper.make_tensor("hi", TensorProto.FLOAT, [], [BAND[1]]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
    ]
    nodes = [
        helper.make_node("Slice", ["image", "starts", "ends", "axes"], ["crop"]),
        helper.make_node("Greater", ["crop", "lo"], ["above"]),
        helper.make_node("Less", ["crop", "hi"], ["below"]),
        helper.make_node("And", ["above", "below"], ["inband"]),
        helper.make_node("Cast", ["inband"], ["fg"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "fg"], ["bg"]),
        helper.make_node("Mul", ["fg", "zero"], ["nil"]),
    ]
    channels = ["bg"] + ["fg" if c == class_index else "nil" for c in range(1, classes)]
    nodes.append(helper.make_node("Concat", channels, ["probabilities"], axis=1))
    graph = helper.make_graph(nodes, "band", [inp], [outp], initializer=consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def card() -> ModelCard:
    shipped = read_card(CARD_PATH)
    post = dict(shipped.postprocessing, tile_input_voxels=TILE_IN, tile_output_voxels=TILE_OUT, tissue_erosion_mm=2)
    return shipped.model_copy(update={"postprocessing": post})


@pytest.fixture(scope="module")
def member(tmp_path_factory: pytest.TempPathFactory) -> OnnxModel:
    path = _band_graph(tmp_path_factory.mktemp("onnx") / "band.onnx")
    return OnnxModel.load(path, ["CPUExecutionProvider"])


def _volume(shape: tuple[int, int, int] = (33, 41, 37), slice_step: int = 3) -> HeadVolume:
    """A 1 mm 'head': a brain-like ellipsoid of 30 HU in air, with a 70 HU blob inside it; axial source slices."""
    z, y, x = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape, dtype=np.float32) - 1) / 2
    radii = np.array(shape, dtype=np.float32) / 2 - 2
    inside = ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2
    hu = np.where(inside <= 1.0, 30.0, -1000.0).astype(np.float32)
    blob = (z - 15) ** 2 + (y - 18) ** 2 + (x - 20) ** 2 <= 4.0**2
    hu[blob] = 70.0
    scaled = (2 * np.clip(hu, -15, 100) - (-15) - 100) / (100 - (-15))
    n_slices = (shape[0] - 1) // slice_step + 1
    slice_of_z = np.minimum(np.rint(np.arange(shape[0]) / slice_step).astype(int), n_slices - 1)
    return HeadVolume(
        image=scaled.astype(np.float32),
        image_hu=hu,
        affine_lps=np.eye(4),
        slice_of_z=slice_of_z,
        sop_instance_uids=[f"1.2.3.{i}" for i in range(n_slices)],
        instance_numbers=[100 + i for i in range(n_slices)],
        pixel_spacing_mm=(1.0, 1.0),
        rows=shape[1],
        cols=shape[2],
    )


def _axial_volume(shape: tuple[int, int, int] = (33, 41, 37), slice_step: int = 3) -> HeadVolume:
    """`_volume` with an affine mapping (z, y, x) to LPS (x, y, z) as axial slices do (row cosine +x, col +y)."""
    volume = _volume(shape, slice_step)
    affine = np.zeros((4, 4))
    affine[0, 2] = 1.0  # voxel x -> L
    affine[1, 1] = 1.0  # voxel y -> P
    affine[2, 0] = 1.0  # voxel z -> S
    affine[3, 3] = 1.0
    volume.affine_lps = affine
    n = len(volume.sop_instance_uids)
    volume.slice_positions_lps = np.array([[0.0, 0.0, float(i * slice_step)] for i in range(n)])
    volume.slice_row_cosines = np.tile([1.0, 0.0, 0.0], (n, 1))
    volume.slice_col_cosines = np.tile([0.0, 1.0, 0.0], (n, 1))
    return volume


def test_card_pipeline_resolves_to_ich() -> None:
    assert isinstance(pipeline_for(read_card(CARD_PATH)), IchPipeline)


def test_tiled_output_equals_the_rule_at_every_voxel(card: ModelCard, member: OnnxModel) -> None:
    volume = _volume()
    raw = segment_volume(volume, [member], card)
    expected = ((volume.image > BAND[0]) & (volume.image < BAND[1])).astype(np.uint8)
    plan = plan_tiles(volume.image_hu, card.postprocessing)
    assert raw.labels.shape == volume.image.shape
    assert raw.tiles_run + raw.tiles_skipped == len(plan.origins) == 4 * 5 * 4
    assert raw.tiles_skipped > 0  # corners of the box hold only air
    # Where tiles ran, the rule holds exactly; skipped tiles are background and hold no tissue by construction.
    ran = np.zeros(volume.image.shape, dtype=bool)
    for (z, y, x), keep in zip(plan.origins, plan.keep, strict=True):
        if keep:
            ran[z : z + TILE_OUT, y : y + TILE_OUT, x : x + TILE_OUT] = True
    np.testing.assert_array_equal(raw.labels[ran], expected[ran])
    assert not raw.labels[~ran].any()
    assert raw.labels[15, 18, 20] == 1


def test_volume_smaller_than_a_tile_is_padded(card: ModelCard, member: OnnxModel) -> None:
    volume = _volume(shape=(7, 12, 9), slice_step=1)
    volume.image_hu[:] = 30.0
    volume.image[:] = 0.5
    post = {**card.postprocessing, "min_tissue_voxels": 1, "tissue_erosion_mm": 0}
    raw = segment_volume(volume, [member], card.model_copy(update={"postprocessing": post}))
    assert raw.labels.shape == (7, 12, 9)
    assert (raw.labels == 1).all()


def test_members_are_averaged(card: ModelCard, member: OnnxModel, tmp_path: Path) -> None:
    # A second member that calls the band EAH: averaged 0.5 IPH / 0.5 EAH, argmax keeps the first (IPH).
    other = OnnxModel.load(_band_graph(tmp_path / "eah.onnx", class_index=2), ["CPUExecutionProvider"])
    raw = segment_volume(_volume(), [member, other], card)
    assert raw.members_run == 2
    assert raw.labels[15, 18, 20] == 1


def test_batched_tiles_give_the_labels_of_one_tile_at_a_time(
    card: ModelCard, member: OnnxModel, tmp_path: Path
) -> None:
    dynamic = OnnxModel.load(_band_graph(tmp_path / "dyn.onnx", batch="batch"), ["CPUExecutionProvider"])
    assert dynamic.fixed_batch is None and member.fixed_batch == 1
    volume = _volume()
    one_by_one = segment_volume(volume, [member], card)
    for batch_size in (3, 64):
        batched = segment_volume(volume, [dynamic], card, batch_size=batch_size)
        np.testing.assert_array_equal(batched.labels, one_by_one.labels)
        assert batched.tiles_run == one_by_one.tiles_run
    # A graph exported with a fixed batch of 1 still takes a batch of tiles: they run one at a time.
    np.testing.assert_array_equal(segment_volume(volume, [member], card, batch_size=5).labels, one_by_one.labels)


def test_wrong_tile_size_is_an_inference_error(card: ModelCard, tmp_path: Path) -> None:
    wrong = OnnxModel.load(_band_graph(tmp_path / "b95.onnx", tile_in=95), ["CPUExecutionProvider"])
    with pytest.raises(InferenceError, match="95"):
        segment_volume(_volume(), [wrong], card)


def test_probability_is_a_logistic_of_volume(card: ModelCard) -> None:
    post = card.postprocessing
    midpoint = post["probability_logistic"]["midpoint_ml"]
    assert bleed_probability(midpoint, post) == pytest.approx(0.5)
    assert bleed_probability(0.0, post) < 0.05
    assert bleed_probability(5.0, post) > 0.99
    values = [bleed_probability(v, post) for v in np.linspace(0, 10, 50)]
    assert values == sorted(values)


def test_small_components_are_dropped(card: ModelCard) -> None:
    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[2:12, 2:12, 2:12] = 1  # 1 mL IPH
    labels[16, 16, 16] = 4  # one voxel of IVH: 0.001 mL, below min_component_ml
    labels[15:18, 2:5, 2:5] = 3  # oedema never counts as blood
    mask, components = bleed_mask(labels, card, voxel_ml=0.001)
    assert mask.sum() == 1000
    assert components.max() == 1


def test_postprocess_reports_subtype_volume_slices_and_overlay(card: ModelCard) -> None:
    volume = _axial_volume()
    labels = np.zeros(volume.image.shape, dtype=np.uint8)
    labels[9:21, 10:25, 10:25] = 2  # EAH, 12 * 15 * 15 voxels = 2.7 mL
    labels[3:6, 3:6, 3:6] = 1  # IPH, 27 voxels = 0.027 mL, below min_component_ml
    labels[25:28, 30:33, 20:23] = 3  # oedema
    raw = IchRaw(labels, members_run=1, tiles_run=3, tiles_skipped=1, providers=["CPUExecutionProvider"])
    series = SeriesInfo("9.9.9", "CT", "1.2.840.10008.5.1.4.1.1.2", len(volume.sop_instance_uids), ())
    (finding,) = IchPipeline(card).postprocess(volume, raw, series)
    assert finding.label == "intracranial_haemorrhage"
    assert finding.flagged and finding.probability > 0.9
    assert finding.series_uid == "9.9.9" and finding.model == "ct-head-ich"
    details = finding.details
    assert details["subtype"] == "EAH"
    assert details["volume_ml"] == pytest.approx(2.7)
    assert details["class_volumes_ml"]["IPH"] == 0.0
    assert details["oedema_ml"] == pytest.approx(0.027)
    assert details["slice_range"] == [3, 7]  # z 9..20 -> source slices 3..7 (every 3 mm)
    assert details["instance_number_range"] == [103, 107]
    assert (details["tiles_run"], details["tiles_skipped"], details["members_run"]) == (3, 1, 1)
    overlay = finding.overlay
    assert overlay is not None and "overlay_note" not in details
    stride = card.postprocessing["overlay_stride"]
    assert overlay.stride == stride
    assert overlay.mask.shape == (-(-volume.rows // stride), -(-volume.cols // stride))
    # The mask sits where the bleed is in the source pixel grid (rows = y 10..24, cols = x 10..24).
    rows, cols = np.nonzero(overlay.mask)
    assert rows.min() * stride >= 10 and rows.max() * stride <= 24
    assert cols.min() * stride >= 10 and cols.max() * stride <= 24
    assert overlay.sop_instance_uid in volume.sop_instance_uids[3:8]
    # The segmentation: the bleed on each source slice it touches (z 9..20 sampled every 3 mm: slices 3..6, z = 9,
    # 12, 15, 18), on the slices' full pixel grid.
    segmentation = finding.segmentation
    assert segmentation is not None
    assert segmentation.sop_instance_uids == volume.sop_instance_uids[3:7]
    assert segmentation.masks.shape == (4, volume.rows, volume.cols) and segmentation.masks.dtype == bool
    rows, cols = np.nonzero(segmentation.masks[0])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (10, 24, 10, 24)
    # Its centre in patient coordinates: x = 17, y = 17, z = 14.5 (LPS mm).
    assert details["centroid_lps_mm"] == pytest.approx([17.0, 17.0, 14.5])


def test_normal_volume_is_not_flagged(card: ModelCard) -> None:
    volume = _axial_volume()
    raw = IchRaw(np.zeros(volume.image.shape, dtype=np.uint8), 1, 4, 0)
    (finding,) = IchPipeline(card).postprocess(volume, raw, SeriesInfo("s", "CT", "", 1, ()))
    assert not finding.flagged and finding.overlay is None
    assert finding.details["volume_ml"] == 0.0 and finding.details["subtype"] is None


def test_card_without_tile_facts_is_refused(card: ModelCard) -> None:
    post = {k: v for k, v in card.postprocessing.items() if k != "tile_output_voxels"}
    with pytest.raises(ModelLoadError, match="tile_output_voxels"):
        IchPipeline(card.model_copy(update={"postprocessing": post}))
