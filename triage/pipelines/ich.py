"""Intracranial haemorrhage on head CT: BLAST-CT DeepMedic members run tile by tile over the whole head."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from triage.domain import Finding, Overlay, SeriesInfo, SliceMasks
from triage.errors import InferenceError, InvalidStudyError, ModelLoadError
from triage.models.card import ModelCard
from triage.models.runtime import OnnxModel
from triage.pipelines.base import ModelPipeline, run_members
from triage.storage import InstanceSource

log = logging.getLogger(__name__)

FINDING_LABEL = "intracranial_haemorrhage"


@dataclass
class HeadVolume:
    """A head CT ready for the network, plus what is needed to map results back to the source slices.

    Attributes:
        image: (z, y, x) float32, windowed and scaled to the card's output range, 1 mm grid, cropped to the head.
            Axis 0 follows the slice normal, axes 1 and 2 the column and row directions of the source slices.
        image_hu: (z, y, x) float32 HU on the same grid.
        affine_lps: (4, 4) maps a voxel index (z, y, x, 1) of `image` to LPS millimetres.
        slice_of_z: (z,) int, for each z plane the index of the nearest source slice in sorted order.
        sop_instance_uids, instance_numbers: per sorted source slice.
        slice_positions_lps, slice_row_cosines, slice_col_cosines: (n, 3) per sorted source slice.
        pixel_spacing_mm: (row spacing, column spacing) of the source slices; rows, cols: their matrix size.
    """

    image: np.ndarray
    image_hu: np.ndarray
    affine_lps: np.ndarray
    slice_of_z: np.ndarray
    sop_instance_uids: list[str]
    instance_numbers: list[int] = field(default_factory=list)
    slice_positions_lps: np.ndarray | None = None
    slice_row_cosines: np.ndarray | None = None
    slice_col_cosines: np.ndarray | None = None
    pixel_spacing_mm: tuple[float, float] = (1.0, 1.0)
    rows: int = 0
    cols: int = 0

    @property
    def voxel_volume_ml(self) -> float:
        spacing = np.linalg.norm(self.affine_lps[:3, :3], axis=0)
        return float(np.prod(spacing)) / 1000.0


@dataclass
class IchRaw:
    """What inference hands to post-processing (small and picklable: no probability volume).

    Attributes:
        labels: (z, y, x) uint8 argmax class of the member-averaged probabilities (card output labels order).
        members_run: ensemble members averaged.
        tiles_run, tiles_skipped: tiles evaluated and tiles skipped for holding no brain tissue.
        providers: the execution providers of the first member's session.
    """

    labels: np.ndarray
    members_run: int
    tiles_run: int
    tiles_skipped: int
    providers: list[str] = field(default_factory=list)
    probabilities: np.ndarray | None = None  # (classes, z, y, x) member mean; only when asked for (measurements)


@dataclass(frozen=True)
class TilePlan:
    """Output-tile origins over a volume, and which of them hold brain tissue."""

    tile_out: int
    origins: list[tuple[int, int, int]]
    keep: list[bool]

    @property
    def tiles_run(self) -> int:
        return int(sum(self.keep))

    @property
    def tiles_skipped(self) -> int:
        return len(self.keep) - self.tiles_run


def _axis_origins(size: int, tile_out: int) -> list[int]:
    """Tile starts covering [0, size): regular steps, the last one pulled back to end at the volume's edge."""
    if size <= tile_out:
        return [0]
    starts = list(range(0, size - tile_out, tile_out))
    starts.append(size - tile_out)
    return starts


def tissue_mask(image_hu: np.ndarray, post: dict[str, Any]) -> np.ndarray:
    """Voxels that may hold brain tissue: HU in the card's tissue range, inside the head eroded by the scalp/skull.

    Args:
        image_hu: (z, y, x) HU on a 1 mm grid.
        post: the card's postprocessing dict (tissue_hu, head_threshold_hu, tissue_erosion_mm).
    """
    lo, hi = post["tissue_hu"]
    head = image_hu > float(post["head_threshold_hu"])
    head = ndimage.binary_fill_holes(head)
    erosion = int(post["tissue_erosion_mm"])  # voxels = mm on the card's 1 mm grid
    if erosion > 0:
        head = ndimage.binary_erosion(head, iterations=erosion)
    return head & (image_hu >= lo) & (image_hu <= hi)


def plan_tiles(image_hu: np.ndarray, post: dict[str, Any]) -> TilePlan:
    """Cover the volume with output tiles of the card's size; skip those with too little brain tissue.

    A tile is skipped only when its output region holds fewer than `min_tissue_voxels` tissue voxels (the card
    sets it to the volume of the smallest bleed component that counts), and dense blood lies inside the tissue
    range, so tiling alone cannot drop a bleed that would be reported. Tiles at the far edge of an axis are pulled
    back to end at the volume's edge (they overlap their neighbour rather than run past the volume).
    """
    tile_out = int(post["tile_output_voxels"])
    tissue = tissue_mask(image_hu, post)
    min_voxels = int(post["min_tissue_voxels"])
    origins, keep = [], []
    for z in _axis_origins(image_hu.shape[0], tile_out):
        for y in _axis_origins(image_hu.shape[1], tile_out):
            for x in _axis_origins(image_hu.shape[2], tile_out):
                origins.append((z, y, x))
                region = tissue[z : z + tile_out, y : y + tile_out, x : x + tile_out]
                keep.append(int(np.count_nonzero(region)) >= min_voxels)
    return TilePlan(tile_out, origins, keep)


@dataclass(frozen=True)
class TileLayout:
    """Where the kept tiles of a volume go back: the plan, the padded working shape and the source shape."""

    plan: TilePlan
    work_shape: tuple[int, int, int]
    shape: tuple[int, int, int]


def tile_inputs(volume: HeadVolume, card: ModelCard) -> tuple[list[np.ndarray], TileLayout]:
    """Cut the network's input tiles (1, tile_in, tile_in, tile_in) of every kept tile, in plan order.

    The volume is padded by the receptive margin (40 voxels each side) with the background value of the scaled
    window (-1: below -15 HU), as the network saw outside the head in training; tiles that hold no brain tissue
    are not cut (they keep probability 1 for background in `assemble_tiles`).
    """
    post = card.postprocessing
    tile_in = int(post["tile_input_voxels"])
    tile_out = int(post["tile_output_voxels"])
    margin = (tile_in - tile_out) // 2
    shape = tuple(int(s) for s in volume.image.shape)
    # Pad so each axis is at least one output tile long, then by the receptive margin on both sides.
    grow = [max(0, tile_out - s) for s in shape]
    padded = np.pad(
        volume.image.astype(np.float32, copy=False),
        [(margin, margin + g) for g in grow],
        mode="constant",
        constant_values=float(post["pad_value"]),
    )
    work_shape = tuple(s + g for s, g in zip(shape, grow, strict=True))
    plan = plan_tiles(np.pad(volume.image_hu, [(0, g) for g in grow], constant_values=-1024.0), post)
    tiles = [
        np.ascontiguousarray(padded[None, z : z + tile_in, y : y + tile_in, x : x + tile_in])
        for (z, y, x), keep in zip(plan.origins, plan.keep, strict=True)
        if keep
    ]
    return tiles, TileLayout(plan, work_shape, shape)  # type: ignore[arg-type]


def sum_tile_members(outputs: list[dict[str, np.ndarray]], card: ModelCard) -> np.ndarray:
    """Sum one tile's class probabilities (classes, t, t, t) over the members that ran on it.

    Raises:
        InferenceError: when a member's output is not the card's (classes, tile_out^3).
    """
    tile_out = int(card.postprocessing["tile_output_voxels"])
    expected = (len(card.outputs.labels), tile_out, tile_out, tile_out)
    name = card.outputs.tensor.name
    total = np.zeros(expected, dtype=np.float32)
    for member_outputs in outputs:
        out = member_outputs.get(name, next(iter(member_outputs.values())))
        if out.shape != expected:
            raise InferenceError(
                f"{card.key}: a member gave output {tuple(out.shape)} for a tile; the card promises {expected}"
            )
        total += out
    return total


def assemble_tiles(
    layout: TileLayout,
    summed_tiles: list[np.ndarray],
    members: int,
    card: ModelCard,
    providers: list[str],
    return_probabilities: bool = False,
) -> IchRaw:
    """Place each kept tile's member-summed probabilities and take the argmax class voxel by voxel."""
    tile_out = layout.plan.tile_out
    summed = np.zeros((len(card.outputs.labels), *layout.work_shape), dtype=np.float32)
    summed[0] = float(members)  # skipped tiles: certain background
    kept = [origin for origin, keep in zip(layout.plan.origins, layout.plan.keep, strict=True) if keep]
    for (z, y, x), tile in zip(kept, summed_tiles, strict=True):
        summed[:, z : z + tile_out, y : y + tile_out, x : x + tile_out] = tile
    z_n, y_n, x_n = layout.shape
    summed = summed[:, :z_n, :y_n, :x_n]
    labels = np.argmax(summed, axis=0).astype(np.uint8)
    raw = IchRaw(labels, members, layout.plan.tiles_run, layout.plan.tiles_skipped, list(providers))
    if return_probabilities:
        raw.probabilities = summed / float(max(1, members))
    return raw


def segment_volume(
    volume: HeadVolume,
    members: list[OnnxModel],
    card: ModelCard,
    return_probabilities: bool = False,
    batch_size: int = 1,
) -> IchRaw:
    """Run every member over the kept tiles, `batch_size` tiles per run, and average class probabilities.

    With `return_probabilities` the member-mean probabilities are kept too.

    Raises:
        InferenceError: when a member's graph does not take the card's tile, or onnxruntime fails.
    """
    if not members:
        raise InferenceError(f"{card.key}: no ensemble member loaded")
    tiles, layout = tile_inputs(volume, card)
    step = max(1, batch_size)
    summed: list[np.ndarray] = []
    for start in range(0, len(tiles), step):
        summed += run_members(members, tiles[start : start + step], lambda out: sum_tile_members(out, card))
    return assemble_tiles(layout, summed, len(members), card, list(members[0].providers), return_probabilities)


def bleed_probability(volume_ml: float, post: dict[str, Any]) -> float:
    """Map the segmented bleed volume (mL) to a study-level probability with the card's logistic.

    p = 1 / (1 + exp(-(volume_ml - midpoint_ml) / scale_ml)); see the card's probability_method for the reasoning.
    """
    logistic = post["probability_logistic"]
    z = (volume_ml - float(logistic["midpoint_ml"])) / float(logistic["scale_ml"])
    z = max(-60.0, min(60.0, z))
    return 1.0 / (1.0 + math.exp(-z))


def bleed_mask(labels: np.ndarray, card: ModelCard, voxel_ml: float) -> tuple[np.ndarray, np.ndarray]:
    """The haemorrhage voxels (card's `bleed_classes`), without components below `min_component_ml`.

    Returns:
        (mask, components): boolean (z, y, x) mask and the int32 component labels of the kept mask (0 = none).
    """
    post = card.postprocessing
    bleed_ids = [card.outputs.labels.index(name) for name in post["bleed_classes"]]
    mask = np.isin(labels, bleed_ids)
    components, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n:
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        small = sizes * voxel_ml < float(post["min_component_ml"])
        small[0] = True
        mask = ~small[components]
        components, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    return mask, components


class IchPipeline(ModelPipeline):
    """BLAST-CT haemorrhage segmentation over the whole head, reduced to one study-level finding."""

    def __init__(self, card: ModelCard) -> None:
        super().__init__(card)
        required = {
            "tile_input_voxels", "tile_output_voxels", "pad_value", "tissue_hu", "head_threshold_hu",
            "tissue_erosion_mm", "min_tissue_voxels", "bleed_classes", "oedema_class", "min_component_ml",
            "probability_logistic", "overlay_stride",
        }  # fmt: skip
        missing = sorted(required - set(card.postprocessing))
        if missing:
            raise ModelLoadError(f"{card.key}: card postprocessing lacks {missing}")
        unknown = [c for c in card.postprocessing["bleed_classes"] if c not in card.outputs.labels]
        if unknown:
            raise ModelLoadError(f"{card.key}: bleed classes {unknown} are not in outputs.labels {card.outputs.labels}")

    # ------------------------------------------------------------------ preprocess
    def load(self, series: SeriesInfo, source: InstanceSource | None = None) -> Any:
        """Read the CT slices in HU from `source`, sorted along the slice normal (a SliceStack).

        Raises:
            InvalidStudyError: when the slices cannot form a volume (from read_ct_stack).
        """
        from triage.dicom.series import read_ct_stack

        return read_ct_stack(series.files, source)

    def preprocess(self, series: Any) -> HeadVolume:
        """Resample the slices to the card's grid, crop to the head, window and scale.

        Takes what `load` returned, or a SeriesInfo whose keys are file paths (then it loads first).

        Raises:
            InvalidStudyError: when the slices cannot form a volume (from read_ct_stack) or the result is empty.
        """
        from triage.pipelines.transforms import build_ct_preprocess

        stack = self.load(series) if isinstance(series, SeriesInfo) else series
        data = build_ct_preprocess(self.card.inputs.preprocessing)({"image": stack})
        return head_volume_from(data, stack)

    # ------------------------------------------------------------------ infer
    def model_inputs(self, prepared: HeadVolume) -> tuple[list[np.ndarray], TileLayout]:
        return tile_inputs(prepared, self.card)

    def reduce_members(self, outputs: list[dict[str, np.ndarray]]) -> np.ndarray:
        return sum_tile_members(outputs, self.card)

    def assemble(
        self, prepared: HeadVolume, context: TileLayout, reduced: list[Any], members: Sequence[OnnxModel]
    ) -> IchRaw:
        return assemble_tiles(context, reduced, len(members), self.card, list(members[0].providers))

    # ------------------------------------------------------------------ postprocess
    def postprocess(self, prepared: HeadVolume, raw: IchRaw, series: SeriesInfo) -> list[Finding]:
        card = self.card
        post = card.postprocessing
        labels = raw.labels
        voxel_ml = prepared.voxel_volume_ml
        mask, components = bleed_mask(labels, card, voxel_ml)
        class_volumes = {
            name: round(float(np.count_nonzero((labels == card.outputs.labels.index(name)) & mask)) * voxel_ml, 3)
            for name in post["bleed_classes"]
        }
        volume_ml = round(sum(class_volumes.values()), 3)
        oedema_ml = round(
            float(np.count_nonzero(labels == card.outputs.labels.index(post["oedema_class"]))) * voxel_ml, 3
        )
        probability = bleed_probability(volume_ml, post)
        threshold = card.finding(FINDING_LABEL).threshold
        details: dict[str, Any] = {
            "volume_ml": volume_ml,
            "subtype": max(class_volumes, key=lambda k: class_volumes[k]) if volume_ml > 0 else None,
            "class_volumes_ml": class_volumes,
            "oedema_ml": oedema_ml,
            "members_run": raw.members_run,
            "tiles_run": raw.tiles_run,
            "tiles_skipped": raw.tiles_skipped,
            "providers": raw.providers,
        }
        overlay = None
        segmentation = None
        if volume_ml > 0:
            details.update(_largest_component_range(components, prepared))
            details["centroid_lps_mm"] = centroid_lps(mask, prepared)
            segmentation = source_slice_masks(mask, prepared)
            overlay, overlay_note = _key_slice_overlay(mask, prepared, int(post["overlay_stride"]))
            if overlay_note:
                details["overlay_note"] = overlay_note
            if overlay is not None:
                details["key_slice_sop_instance_uid"] = overlay.sop_instance_uid
        return [
            Finding(
                label=FINDING_LABEL,
                probability=probability,
                flagged=probability >= threshold,
                model=card.name,
                model_version=card.version,
                synthetic=card.synthetic,
                series_uid=series.series_uid,
                details=details,
                overlay=overlay,
                segmentation=segmentation,
            )
        ]


def _largest_component_range(components: np.ndarray, volume: HeadVolume) -> dict[str, Any]:
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    largest = int(np.argmax(sizes))
    zs = np.flatnonzero(np.any(components == largest, axis=(1, 2)))
    first, last = int(volume.slice_of_z[zs.min()]), int(volume.slice_of_z[zs.max()])
    out: dict[str, Any] = {
        "largest_component_ml": round(float(sizes[largest]) * volume.voxel_volume_ml, 3),
        "slice_range": [first, last],  # indices in the series sorted along the slice normal
    }
    if volume.instance_numbers:
        numbers = volume.instance_numbers[first : last + 1]
        out["instance_number_range"] = [int(min(numbers)), int(max(numbers))]
    return out


def _key_slice_overlay(mask: np.ndarray, volume: HeadVolume, stride: int) -> tuple[Overlay | None, str]:
    """The bleed mask on the source slice with the largest bleed area, in that slice's pixel grid.

    Each (strided) source pixel's LPS position is mapped through the inverse affine to the nearest voxel of the
    resampled mask, so gantry tilt and uneven spacing are handled by geometry, not by slice counting.
    """
    area = np.bincount(volume.slice_of_z, weights=mask.sum(axis=(1, 2)), minlength=len(volume.sop_instance_uids))
    key = int(np.argmax(area))
    uid = volume.sop_instance_uids[key]
    if volume.slice_positions_lps is None or volume.slice_row_cosines is None or volume.slice_col_cosines is None:
        zs = np.flatnonzero(volume.slice_of_z == key)
        plane = int(zs[np.argmax(mask[zs].sum(axis=(1, 2)))])
        return (
            Overlay(uid, mask[plane, ::stride, ::stride].astype(np.float32), stride),
            "overlay drawn on the resampled axial plane (source slice geometry unavailable)",
        )
    return Overlay(uid, _mask_on_slice(mask, volume, key, stride).astype(np.float32), stride), ""


def _mask_on_slice(mask: np.ndarray, volume: HeadVolume, index: int, stride: int = 1) -> np.ndarray:
    """The resampled (z, y, x) `mask` on source slice `index`'s own pixel grid (every `stride`-th pixel), bool.

    Each source pixel's LPS position is mapped through the inverse affine to the nearest voxel of the mask, so
    gantry tilt and uneven spacing are handled by geometry, not by slice counting.
    """
    assert volume.slice_positions_lps is not None and volume.slice_row_cosines is not None
    assert volume.slice_col_cosines is not None
    rows = np.arange(0, volume.rows, stride)
    cols = np.arange(0, volume.cols, stride)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    row_mm, col_mm = volume.pixel_spacing_mm
    # PS3.3 C.7.6.2.1.1: position = IPP + row_cosine * col_index * col_spacing + col_cosine * row_index * row_spacing
    points = (
        volume.slice_positions_lps[index][None, None, :]
        + volume.slice_row_cosines[index][None, None, :] * (cc[..., None] * col_mm)
        + volume.slice_col_cosines[index][None, None, :] * (rr[..., None] * row_mm)
    )
    inverse = np.linalg.inv(volume.affine_lps)
    voxel = points @ inverse[:3, :3].T + inverse[:3, 3]
    nearest = np.rint(voxel).astype(np.int64)
    inside = np.all((nearest >= 0) & (nearest < np.array(mask.shape)), axis=-1)
    out = np.zeros(rr.shape, dtype=bool)
    sel = nearest[inside]
    out[inside] = mask[sel[:, 0], sel[:, 1], sel[:, 2]] > 0
    return out


def source_slice_masks(mask: np.ndarray, volume: HeadVolume) -> SliceMasks | None:
    """The bleed on every source slice it touches, on each slice's full pixel grid (what a DICOM Segmentation of
    the source series holds). None when the mask is empty or the source geometry is unknown."""
    if not mask.any() or volume.slice_positions_lps is None or not volume.rows or not volume.cols:
        return None
    uids: list[str] = []
    masks: list[np.ndarray] = []
    for index, uid in enumerate(volume.sop_instance_uids):
        on_slice = _mask_on_slice(mask, volume, index)
        if on_slice.any():
            uids.append(uid)
            masks.append(on_slice)
    if not masks:
        return None
    return SliceMasks(uids, np.stack(masks))


def centroid_lps(mask: np.ndarray, volume: HeadVolume) -> list[float] | None:
    """The centre of the bleed in patient coordinates (LPS, mm), or None for an empty mask."""
    voxels = np.argwhere(mask > 0)
    if not len(voxels):
        return None
    centre = voxels.mean(axis=0)
    point = volume.affine_lps[:3, :3] @ centre + volume.affine_lps[:3, 3]
    return [round(float(v), 2) for v in point]


def _meta_value(data: dict[str, Any], image: Any, key: str) -> Any:
    if key in data:
        return data[key]
    meta = getattr(image, "meta", None) or {}
    if key in meta:
        return meta[key]
    raise InvalidStudyError(f"CT preprocessing produced no {key!r}; keys: {sorted(data)} meta: {sorted(meta)}")


def _plain(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def head_volume_from(data: dict[str, Any], stack: Any | None = None) -> HeadVolume:
    """Turn the CT preprocessing output (dict with "image", "image_hu" and meta) into a plain HeadVolume.

    Args:
        data: output of `build_ct_preprocess(...)({"image": stack})`: "image" (1, z, y, x) scaled, "image_hu"
            (1, z, y, x) HU, and affine_lps, slice_of_z, sop_instance_uids as keys or in the image's meta.
        stack: the SliceStack the volume came from (source slice geometry for the overlay), if available.

    Raises:
        InvalidStudyError: when the preprocessing output lacks a key or the cropped volume is empty.
    """
    image = data["image"]
    scaled = _plain(image).astype(np.float32)
    hu = _plain(_meta_value(data, image, "image_hu")).astype(np.float32)
    if scaled.ndim == 4:
        scaled = scaled[0]
    if hu.ndim == 4:
        hu = hu[0]
    if scaled.size == 0 or scaled.shape != hu.shape:
        raise InvalidStudyError(
            f"CT preprocessing gave image {scaled.shape} and HU {hu.shape}; expected equal, non-empty"
        )
    volume = HeadVolume(
        image=scaled,
        image_hu=hu,
        affine_lps=_plain(_meta_value(data, image, "affine_lps")).astype(np.float64),
        slice_of_z=_plain(_meta_value(data, image, "slice_of_z")).astype(np.int64),
        sop_instance_uids=[str(u) for u in _meta_value(data, image, "sop_instance_uids")],
    )
    if stack is not None:
        volume.instance_numbers = [int(n) for n in stack.instance_numbers]
        volume.slice_positions_lps = np.asarray(stack.positions_lps, dtype=np.float64)
        volume.slice_row_cosines = np.asarray(stack.row_cosines, dtype=np.float64)
        volume.slice_col_cosines = np.asarray(stack.col_cosines, dtype=np.float64)
        volume.pixel_spacing_mm = (float(stack.pixel_spacing_mm[0]), float(stack.pixel_spacing_mm[1]))
        volume.rows, volume.cols = int(stack.pixels_hu.shape[1]), int(stack.pixels_hu.shape[2])
    return volume
