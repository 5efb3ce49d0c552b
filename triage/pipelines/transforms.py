"""CT preprocessing: resampling a (tilted, unevenly spaced) slice stack to a regular grid, head crop, HU window.

MONAI pairing: `X` works on one array (or one `SliceStack`), `Xd` on a dictionary and passes unknown keys
through. Dictionary and metadata keys are the constants below.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, CopyItemsd, MapTransform, ScaleIntensityRange, SpatialCrop, Transform
from monai.utils import MetaKeys, SpaceKeys
from scipy import ndimage

from triage.dicom.series import AIR_HU, SliceStack
from triage.errors import InvalidStudyError, ModelLoadError

# Dictionary keys.
IMAGE_KEY = "image"  # in: a SliceStack; out: (1, z, y, x) float32 MetaTensor, windowed to the output range
IMAGE_HU_KEY = "image_hu"  # out: (1, z, y, x) float32 MetaTensor in HU on the same (cropped) grid

# Metadata keys (MetaTensor.meta).
AFFINE_LPS_META = "affine_lps"  # (4, 4) float64: voxel index (z, y, x, 1) -> LPS mm
SLICE_OF_Z_META = "slice_of_z"  # (z,) int64: index in the sorted stack of the source slice nearest each plane
SOP_UIDS_META = "sop_instance_uids"  # list[str]: SOP Instance UID of each sorted source slice
FRAME_NUMBERS_META = "frame_numbers"  # list[int]: 1-based frame of each sorted source slice in its instance
SPACING_META = "spacing_mm"  # (dz, dy, dx) mm
CROP_BOX_META = "crop_box"  # (z0, z1, y0, y1, x0, x1), ends exclusive, in the resampled (uncropped) grid
GRID_SHAPE_META = "resampled_shape"  # (z, y, x) of the resampled grid before cropping

# The keys a card's `inputs.preprocessing` must give for `build_ct_preprocess`.
PREPROCESSING_KEYS = ("spacing_mm", "window_hu", "output_range", "head_threshold_hu", "crop_margin_mm")

# Voxels within this distance (mm) of the first or last slice plane count as inside the stack.
_PLANE_TOLERANCE_MM = 1e-3
# Bounds on one resampling chunk: (voxel, candidate slice) pairs (float64 distances: 32 MiB) and voxels
# (about 180 bytes of work arrays each: 90 MiB).
_CHUNK_ELEMENTS = 1 << 22
_CHUNK_VOXELS = 1 << 19


@dataclass
class ResampledVolume:
    """A CT volume on a regular grid aligned with the slices.

    Axis 0 follows the (mean) slice normal, axis 1 the column direction (down the rows of the source image),
    axis 2 the row direction, so `array[k]` looks like an original axial slice.

    Attributes:
        array: float32 (z, y, x) in HU; -1024 outside the acquired stack.
        affine_lps: float64 (4, 4) mapping voxel index (z, y, x, 1) to LPS mm.
        slice_of_z: int64 (z,): for each output plane, the index in the sorted stack of the nearest source slice
            (measured at the plane's centre).
        sop_instance_uids: SOP Instance UID of each sorted source slice (what `slice_of_z` indexes).
        spacing_mm: (dz, dy, dx) of the grid in mm.
        frame_numbers: 1-based frame number of each sorted source slice (1 for single-frame instances).
    """

    array: np.ndarray
    affine_lps: np.ndarray
    slice_of_z: np.ndarray
    sop_instance_uids: list[str]
    spacing_mm: tuple[float, float, float]
    frame_numbers: list[int] = field(default_factory=list)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _reference_frame(stack: SliceStack) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orthonormal (normal, column, row) LPS axes of the output grid: the mean slice orientation."""
    normal = _unit(stack.normals.mean(axis=0))
    row = stack.row_cosines.mean(axis=0)
    row = _unit(row - (row @ normal) * normal)
    col = np.cross(normal, row)  # right-handed: row x col = normal
    return normal, col, row


def _check_spacing(spacing_mm: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in spacing_mm)
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing_mm must be three positive numbers (dz, dy, dx) in mm; got {list(spacing_mm)}")
    return values  # type: ignore[return-value]


def resample_stack(stack: SliceStack, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0)) -> ResampledVolume:
    """Resample a sorted slice stack onto a regular grid, undoing gantry tilt and uneven slice spacing.

    Each output voxel's LPS position is placed between the two source slice planes that bracket it (by its
    signed distance to each plane, so tilted and variably tilted planes are honoured), sampled bilinearly in
    each of the two planes at its orthogonal projection, and the two samples are blended linearly by distance.
    The grid starts at the first slice plane and ends within one spacing of the last; in-plane it covers every
    source pixel centre (the union of the sheared slices). Voxels before the first plane, after the last, or
    outside both slices' fields of view are -1024 HU (air). Where only one of the two slices
    covers a voxel, the other contributes -1024. If planes of a variably tilted stack cross inside the field
    of view, the first bracketing pair along the stack is used.

    Memory: the output (4 bytes per voxel) plus work arrays for one chunk at a time. A chunk is a run of output
    rows of one plane, at most `_CHUNK_VOXELS` voxels and at most `_CHUNK_ELEMENTS` (voxel, candidate slice)
    pairs, the candidates being the slices whose planes can bracket a voxel of the plane (2 for a stack of
    parallel slices). Its work arrays take about 180 bytes per voxel (measured with tracemalloc) plus 8 bytes
    per (voxel, candidate) pair: at most about 90 MiB + 32 MiB. For the 28-slice GE head CT at 1 mm the output
    is 145 x 299 x 251 (43.5 MB) and the peak beyond it 13.5 MB (one 75,000-voxel plane per chunk). The source
    pixels are read in place from `stack.pixels_hu`.

    Args:
        stack: slices sorted along the normal (`read_ct_stack` output).
        spacing_mm: output spacing (dz, dy, dx) in mm along (normal, column direction, row direction).

    Returns:
        The resampled volume and its geometry.

    Raises:
        ValueError: when `spacing_mm` is not three positive numbers.
        InvalidStudyError: when the stack has fewer than 2 slices.
    """
    dz, dy, dx = _check_spacing(spacing_mm)
    n_slices, n_rows, n_cols = stack.pixels_hu.shape
    if n_slices < 2:
        raise InvalidStudyError(f"resampling needs at least 2 slices; the stack has {n_slices}")
    normal, col, row = _reference_frame(stack)
    frame = np.stack([normal, col, row])  # (3, 3): output axis k's LPS direction in row k
    row_spacing, col_spacing = stack.pixel_spacing_mm

    # Every source pixel-centre corner, in output-frame coordinates (mm along normal, column, row).
    corner_v = np.array([0.0, 0.0, n_rows - 1.0, n_rows - 1.0]) * row_spacing
    corner_u = np.array([0.0, n_cols - 1.0, 0.0, n_cols - 1.0]) * col_spacing
    corners = (
        stack.positions_lps[:, None, :]
        + corner_v[None, :, None] * stack.col_cosines[:, None, :]
        + corner_u[None, :, None] * stack.row_cosines[:, None, :]
    ).reshape(-1, 3) @ frame.T
    low, high = corners.min(axis=0), corners.max(axis=0)
    spacing = np.array([dz, dy, dx])
    steps = (high - low) / spacing
    # In-plane the grid reaches past every source pixel centre; along the normal it stops at or before the
    # last plane (within one spacing), so no plane of the volume lies wholly beyond the stack.
    shape = (
        int(np.floor(steps[0] + 1e-6)) + 1,
        int(np.ceil(steps[1] - 1e-6)) + 1,
        int(np.ceil(steps[2] - 1e-6)) + 1,
    )
    origin = low @ frame  # LPS of voxel (0, 0, 0)

    affine = np.eye(4)
    affine[:3, :3] = frame.T * spacing[None, :]
    affine[:3, 3] = origin

    # For slice j, signed distance d, row index v and column index u are affine in the output index (z, y, x):
    # value = coef[j, 0] + z * coef[j, 1] + y * coef[j, 2] + x * coef[j, 3].
    normals = stack.normals
    step = frame * spacing[:, None]  # (3, 3): LPS step per unit of z, y, x
    rel = origin[None, :] - stack.positions_lps  # (n, 3)

    def coefficients(direction: np.ndarray, scale: float) -> np.ndarray:
        base = np.einsum("nk,nk->n", rel, direction)
        steps = direction @ step.T  # (n, 3)
        return np.column_stack([base, steps]) / scale

    coef_d = coefficients(normals, 1.0)
    coef_v = coefficients(stack.col_cosines, row_spacing)
    coef_u = coefficients(stack.row_cosines, col_spacing)

    nz, ny, nx = shape
    out = np.empty(shape, dtype=np.float32)
    flat_pixels = stack.pixels_hu.reshape(-1)
    xs = np.arange(nx, dtype=np.float64)

    for z in range(nz):
        # The two candidate-range bounds only depend on the plane's four corners (d is affine in y, x).
        plane_d = coef_d[:, 0] + z * coef_d[:, 1]
        corner_y = np.array([0.0, 0.0, ny - 1.0, ny - 1.0])
        corner_x = np.array([0.0, nx - 1.0, 0.0, nx - 1.0])
        corner_d = plane_d[:, None] + corner_y[None, :] * coef_d[:, 2:3] + corner_x[None, :] * coef_d[:, 3:4]
        first, last = _candidate_range(corner_d.min(axis=1), corner_d.max(axis=1))
        n_candidates = last - first + 1
        rows_per_chunk = max(1, min(_CHUNK_VOXELS, _CHUNK_ELEMENTS // n_candidates) // nx)
        for y0 in range(0, ny, rows_per_chunk):
            y1 = min(ny, y0 + rows_per_chunk)
            yy = np.repeat(np.arange(y0, y1, dtype=np.float64), nx)
            xx = np.tile(xs, y1 - y0)
            out[z, y0:y1] = _sample_chunk(
                z, yy, xx, first, last, coef_d, coef_v, coef_u, flat_pixels, n_rows, n_cols
            ).reshape(y1 - y0, nx)

    # Nearest source slice of each output plane, measured at the plane's centre.
    centre = np.stack([np.arange(nz, dtype=np.float64), np.full(nz, (ny - 1) / 2), np.full(nz, (nx - 1) / 2)], 1)
    centre_d = coef_d[None, :, 0] + centre @ coef_d[:, 1:].T  # (nz, n)
    slice_of_z = np.abs(centre_d).argmin(axis=1).astype(np.int64)

    return ResampledVolume(
        array=out,
        affine_lps=affine,
        slice_of_z=slice_of_z,
        sop_instance_uids=list(stack.sop_instance_uids),
        spacing_mm=(dz, dy, dx),
        frame_numbers=list(stack.frame_numbers) or [1] * n_slices,
    )


def _candidate_range(d_min: np.ndarray, d_max: np.ndarray) -> tuple[int, int]:
    """The sorted-slice index range whose planes can bracket some voxel of a chunk (at least 2 slices).

    `d_min`/`d_max` (n,) bound each slice's signed distance over the chunk. The last slice the whole chunk lies
    beyond and the first slice the whole chunk lies before enclose every bracketing pair when planes do not
    cross inside the chunk.
    """
    n = d_min.shape[0]
    behind = np.flatnonzero(d_min >= -_PLANE_TOLERANCE_MM)
    ahead = np.flatnonzero(d_max <= _PLANE_TOLERANCE_MM)
    first = int(behind[-1]) if behind.size else 0
    last = int(ahead[0]) if ahead.size else n - 1
    first, last = min(first, last), max(first, last)
    if last == first:
        if last < n - 1:
            last += 1
        else:
            first -= 1
    return first, last


def _sample_chunk(
    z: int,
    yy: np.ndarray,
    xx: np.ndarray,
    first: int,
    last: int,
    coef_d: np.ndarray,
    coef_v: np.ndarray,
    coef_u: np.ndarray,
    flat_pixels: np.ndarray,
    n_rows: int,
    n_cols: int,
) -> np.ndarray:
    """HU at output voxels (z, yy, xx) from the bracketing slice pair among slices first..last."""
    cand = slice(first, last + 1)
    c = coef_d[cand]
    d = (c[:, 0] + z * c[:, 1])[None, :] + yy[:, None] * c[None, :, 2] + xx[:, None] * c[None, :, 3]
    brackets = (d[:, :-1] >= -_PLANE_TOLERANCE_MM) & (d[:, 1:] <= _PLANE_TOLERANCE_MM)
    inside = brackets.any(axis=1)
    pair = brackets.argmax(axis=1)
    index = np.arange(d.shape[0])
    d_lo = d[index, pair]
    d_hi = d[index, pair + 1]
    weight = np.clip(d_lo / np.maximum(d_lo - d_hi, 1e-9), 0.0, 1.0)
    lo = pair + first

    def sample(slice_index: np.ndarray) -> np.ndarray:
        """Bilinear HU of each voxel's projection onto its slice `slice_index` (AIR_HU outside that slice)."""
        values = np.empty(slice_index.shape[0], dtype=np.float32)
        k_min, k_max = int(slice_index.min()), int(slice_index.max())
        # Voxels are handled per source slice, so the geometry coefficients are scalars (usually 1-3 slices).
        for k in range(k_min, k_max + 1):
            sel = slice(None) if k_min == k_max else np.flatnonzero(slice_index == k)
            y, x = yy[sel], xx[sel]
            if y.size == 0:
                continue
            cv, cu = coef_v[k], coef_u[k]
            v = (cv[0] + z * cv[1]) + y * cv[2] + x * cv[3]
            u = (cu[0] + z * cu[1]) + y * cu[2] + x * cu[3]
            # A pixel covers +-half a pixel around its centre; beyond that is outside the field of view.
            covered = (v >= -0.5) & (v <= n_rows - 0.5) & (u >= -0.5) & (u <= n_cols - 0.5)
            np.clip(v, 0.0, n_rows - 1.0, out=v)
            np.clip(u, 0.0, n_cols - 1.0, out=u)
            v0 = np.minimum(v.astype(np.int64), n_rows - 2)
            u0 = np.minimum(u.astype(np.int64), n_cols - 2)
            fv = (v - v0).astype(np.float32)
            fu = (u - u0).astype(np.float32)
            base = v0 * n_cols + u0
            pixels = flat_pixels[k * n_rows * n_cols : (k + 1) * n_rows * n_cols]
            p00, p01 = pixels[base], pixels[base + 1]
            p10, p11 = pixels[base + n_cols], pixels[base + n_cols + 1]
            top = p00 + (p01 - p00) * fu
            bilinear = top + (p10 + (p11 - p10) * fu - top) * fv
            values[sel] = np.where(covered, bilinear, np.float32(AIR_HU))
        return values

    w = weight.astype(np.float32)
    low_values = sample(lo)
    values = low_values + (sample(lo + 1) - low_values) * w
    return np.where(inside, values, np.float32(AIR_HU)).astype(np.float32, copy=False)


def _stack_meta(volume: ResampledVolume) -> dict[str, Any]:
    return {
        AFFINE_LPS_META: volume.affine_lps,
        SLICE_OF_Z_META: volume.slice_of_z,
        SOP_UIDS_META: volume.sop_instance_uids,
        FRAME_NUMBERS_META: volume.frame_numbers,
        SPACING_META: volume.spacing_mm,
        GRID_SHAPE_META: tuple(volume.array.shape),
        CROP_BOX_META: (0, volume.array.shape[0], 0, volume.array.shape[1], 0, volume.array.shape[2]),
        MetaKeys.SPACE: SpaceKeys.LPS,
    }


class ResampleStack(Transform):
    """SliceStack -> (1, z, y, x) float32 MetaTensor in HU on a regular grid (see `resample_stack`).

    The MetaTensor's affine is the LPS affine (meta `space` is LPS); the meta also holds `affine_lps`,
    `slice_of_z`, `sop_instance_uids`, `frame_numbers`, `spacing_mm` and a full-grid `crop_box`.
    """

    def __init__(self, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        self.spacing_mm = _check_spacing(spacing_mm)

    def __call__(self, stack: SliceStack) -> MetaTensor:
        if not isinstance(stack, SliceStack):
            raise TypeError(f"ResampleStack expects a SliceStack (from read_ct_stack); got {type(stack).__name__}")
        volume = resample_stack(stack, self.spacing_mm)
        return MetaTensor(
            torch.from_numpy(volume.array[np.newaxis]),
            affine=torch.as_tensor(volume.affine_lps, dtype=torch.float64),
            meta=_stack_meta(volume),
        )


class ResampleStackd(MapTransform):
    """Dictionary version of `ResampleStack`: each key's SliceStack becomes a (1, z, y, x) MetaTensor."""

    def __init__(
        self, keys: KeysCollection, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0), allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.resampler = ResampleStack(spacing_mm)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resampler(d[key])
        return d


def _as_meta_tensor(img: Any, name: str) -> MetaTensor:
    if not isinstance(img, MetaTensor) or img.ndim != 4 or img.shape[0] != 1:
        shape = tuple(getattr(img, "shape", ()))
        raise TypeError(f"{name} expects a (1, z, y, x) MetaTensor from ResampleStack; got {type(img).__name__}{shape}")
    return img


class CropHead(Transform):
    """Crop a resampled CT to the largest connected region above a HU threshold, plus a margin in mm.

    The head (or body) is the largest 6-connected component above `threshold_hu`; the table, headrest and
    noise outside it are left out. The crop box (z0, z1, y0, y1, x0, x1; ends exclusive, in the resampled grid)
    is recorded in meta `crop_box`, and `affine_lps` and `slice_of_z` are updated, so outputs map back to the
    source slices.

    Raises:
        InvalidStudyError: when no voxel is above the threshold (the series shows no body).
    """

    def __init__(self, threshold_hu: float = -300.0, margin_mm: float = 5.0) -> None:
        if not math.isfinite(float(threshold_hu)):
            raise ValueError(f"threshold_hu must be a finite number of HU; got {threshold_hu!r}")
        if not (math.isfinite(float(margin_mm)) and float(margin_mm) >= 0):
            raise ValueError(f"margin_mm must be a non-negative number of mm; got {margin_mm!r}")
        self.threshold_hu = float(threshold_hu)
        self.margin_mm = float(margin_mm)

    def compute_box(self, img: MetaTensor) -> tuple[int, int, int, int, int, int]:
        """The crop box, relative to `img`'s own grid (ends exclusive)."""
        img = _as_meta_tensor(img, "CropHead")
        volume = img[0].detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img[0])
        labels, n_labels = ndimage.label(volume > self.threshold_hu)
        if n_labels == 0:
            raise InvalidStudyError(
                f"no voxel above {self.threshold_hu:g} HU (maximum {float(volume.max()):.0f} HU): "
                "the series shows no head or body to crop to"
            )
        sizes = np.bincount(labels.reshape(-1))
        sizes[0] = 0
        largest = int(sizes.argmax())
        box = ndimage.find_objects((labels == largest).astype(np.int8))[0]
        spacing = img.meta.get(SPACING_META, (1.0, 1.0, 1.0))
        bounds: list[int] = []
        for axis, region in enumerate(box):
            margin = int(math.ceil(self.margin_mm / float(spacing[axis]) - 1e-9))
            bounds += [max(0, region.start - margin), min(volume.shape[axis], region.stop + margin)]
        return tuple(bounds)  # type: ignore[return-value]

    def crop(self, img: MetaTensor, box: Sequence[int]) -> MetaTensor:
        """Crop `img` to `box` (relative to its grid) and update the geometry in its meta."""
        img = _as_meta_tensor(img, "CropHead")
        z0, z1, y0, y1, x0, x1 = (int(v) for v in box)
        meta = dict(img.meta)
        cropped = SpatialCrop(roi_start=(z0, y0, x0), roi_end=(z1, y1, x1))(img)
        assert isinstance(cropped, MetaTensor)
        shift = np.eye(4)
        shift[:3, 3] = (z0, y0, x0)
        if AFFINE_LPS_META in meta:
            cropped.meta[AFFINE_LPS_META] = np.asarray(meta[AFFINE_LPS_META]) @ shift
        if SLICE_OF_Z_META in meta:
            cropped.meta[SLICE_OF_Z_META] = np.asarray(meta[SLICE_OF_Z_META])[z0:z1]
        # Boxes compose: a crop of a crop is recorded in the original resampled grid.
        pz, _, py, _, px, _ = meta.get(CROP_BOX_META, (0, 0, 0, 0, 0, 0))
        cropped.meta[CROP_BOX_META] = (pz + z0, pz + z1, py + y0, py + y1, px + x0, px + x1)
        return cropped

    def __call__(self, img: MetaTensor) -> MetaTensor:
        return self.crop(img, self.compute_box(img))


class CropHeadd(MapTransform):
    """Dictionary version of `CropHead`: the box found on `source_key` crops every key in `keys`."""

    def __init__(
        self,
        keys: KeysCollection,
        source_key: str = IMAGE_KEY,
        threshold_hu: float = -300.0,
        margin_mm: float = 5.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key
        self.cropper = CropHead(threshold_hu, margin_mm)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        box = self.cropper.compute_box(d[self.source_key])
        for key in self.key_iterator(d):
            d[key] = self.cropper.crop(d[key], box)
        return d


def _check_pair(value: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be two numbers [low, high]; got {value!r}") from exc
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{name} must be two finite numbers with low < high; got {value!r}")
    return lo, hi


class WindowHU(Transform):
    """Clip HU to `window_hu` [lo, hi] and scale linearly to `output_range` (float32; meta is kept)."""

    def __init__(self, window_hu: Sequence[float], output_range: Sequence[float] = (-1.0, 1.0)) -> None:
        self.window_hu = _check_pair(window_hu, "window_hu")
        self.output_range = _check_pair(output_range, "output_range")
        self.scaler = ScaleIntensityRange(
            a_min=self.window_hu[0],
            a_max=self.window_hu[1],
            b_min=self.output_range[0],
            b_max=self.output_range[1],
            clip=True,
            dtype=np.float32,
        )

    def __call__(self, img: Any) -> Any:
        return self.scaler(img)


class WindowHUd(MapTransform):
    """Dictionary version of `WindowHU`."""

    def __init__(
        self,
        keys: KeysCollection,
        window_hu: Sequence[float],
        output_range: Sequence[float] = (-1.0, 1.0),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.window = WindowHU(window_hu, output_range)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.window(d[key])
        return d


def build_ct_preprocess(preprocessing: Mapping[str, Any]) -> Compose:
    """The CT preprocessing a model card asks for, as a MONAI Compose on dictionaries.

    Input: {IMAGE_KEY: SliceStack, ...}. Output: IMAGE_KEY is a (1, z, y, x) float32 MetaTensor, resampled
    to `spacing_mm`, cropped to the head, clipped to `window_hu` and scaled to `output_range`; IMAGE_HU_KEY is
    the same cropped grid in HU (post-processing uses it for tissue masks). Both carry meta `affine_lps` (of the
    cropped grid), `crop_box`, `slice_of_z` (cropped), `sop_instance_uids`, `frame_numbers`, `spacing_mm`.
    Other keys pass through.

    Args:
        preprocessing: the card's `inputs.preprocessing`, with `spacing_mm` [dz, dy, dx] (mm), `window_hu`
            [lo, hi], `output_range` [lo, hi], `head_threshold_hu` and `crop_margin_mm`. Other keys are ignored
            (they belong to other stages).

    Raises:
        ModelLoadError: when a key is missing or a value is malformed (the card is wrong, not the study).
    """
    missing = [k for k in PREPROCESSING_KEYS if k not in preprocessing]
    if missing:
        raise ModelLoadError(
            f"the card's inputs.preprocessing lacks {missing}; CT preprocessing needs {list(PREPROCESSING_KEYS)}, "
            f"e.g. spacing_mm [1, 1, 1], window_hu [-15, 100], output_range [-1, 1], head_threshold_hu -300, "
            f"crop_margin_mm 5 (it has {sorted(preprocessing)})"
        )
    try:
        return Compose(
            [
                ResampleStackd(IMAGE_KEY, spacing_mm=preprocessing["spacing_mm"]),
                CropHeadd(
                    IMAGE_KEY,
                    source_key=IMAGE_KEY,
                    threshold_hu=float(preprocessing["head_threshold_hu"]),
                    margin_mm=float(preprocessing["crop_margin_mm"]),
                ),
                CopyItemsd(IMAGE_KEY, names=IMAGE_HU_KEY),
                WindowHUd(IMAGE_KEY, window_hu=preprocessing["window_hu"], output_range=preprocessing["output_range"]),
            ]
        )
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"the card's inputs.preprocessing is malformed: {exc}") from exc
