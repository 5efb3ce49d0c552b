"""CT preprocessing: resampling tilted and unevenly spaced stacks, head crop, HU window, the card-built Compose."""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from triage.dicom.series import AIR_HU, SliceStack, read_ct_stack
from triage.errors import InvalidStudyError, ModelLoadError
from triage.pipelines.transforms import (
    AFFINE_LPS_META,
    CROP_BOX_META,
    IMAGE_HU_KEY,
    IMAGE_KEY,
    SLICE_OF_Z_META,
    SOP_UIDS_META,
    SPACING_META,
    CropHead,
    CropHeadd,
    ResampleStackd,
    WindowHU,
    WindowHUd,
    build_ct_preprocess,
    resample_stack,
)

REAL_HEAD_CT = [
    Path(__file__).resolve().parents[2] / "data" / "ct-head-ge",
    Path("/work/shared/data/ct-head-ge"),
]
PREPROCESSING = {
    "spacing_mm": [1.0, 1.0, 1.0],
    "window_hu": [-15, 100],
    "output_range": [-1, 1],
    "head_threshold_hu": -300,
    "crop_margin_mm": 5,
}


def make_stack(
    zs: Sequence[float],
    tilts_deg: Sequence[float] | float = 0.0,
    *,
    rows: int = 48,
    cols: int = 40,
    spacing: tuple[float, float] = (2.0, 2.0),
    content: Callable[[np.ndarray], np.ndarray] | None = None,
    seed: int = 0,
) -> SliceStack:
    """Slices whose centres lie at (0, 0, z): the table moves along z while each plane is tilted about x.

    `content` gives HU at LPS points (..., 3); by default each slice is random noise (for exact comparisons).
    """
    tilts = [float(tilts_deg)] * len(zs) if isinstance(tilts_deg, int | float) else list(tilts_deg)
    rng = np.random.default_rng(seed)
    rows_c, cols_c, positions, pixels = [], [], [], []
    for z, tilt in zip(zs, tilts, strict=True):
        t = math.radians(tilt)
        row = np.array([1.0, 0.0, 0.0])
        col = np.array([0.0, math.cos(t), -math.sin(t)])
        position = np.array([0.0, 0.0, z]) - (cols - 1) / 2 * spacing[1] * row - (rows - 1) / 2 * spacing[0] * col
        i = np.arange(rows)[:, None, None]
        j = np.arange(cols)[None, :, None]
        points = position + j * spacing[1] * row + i * spacing[0] * col
        values = rng.uniform(-100, 100, (rows, cols)) if content is None else content(points)
        rows_c.append(row)
        cols_c.append(col)
        positions.append(position)
        pixels.append(values)
    return SliceStack(
        pixels_hu=np.asarray(pixels, dtype=np.float32),
        positions_lps=np.asarray(positions),
        row_cosines=np.asarray(rows_c),
        col_cosines=np.asarray(cols_c),
        pixel_spacing_mm=spacing,
        sop_instance_uids=[f"1.2.3.{k}" for k in range(len(zs))],
        instance_numbers=list(range(1, len(zs) + 1)),
        slice_thickness_mm=[2.0] * len(zs),
        frame_numbers=[1] * len(zs),
    )


def voxel_lps(affine: np.ndarray, index: np.ndarray) -> np.ndarray:
    return index @ affine[:3, :3].T + affine[:3, 3]


def reference_resample(stack: SliceStack, affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A slow, loop-based statement of the resampling rule, written independently of the implementation."""
    n, rows, cols = stack.pixels_hu.shape
    normals = np.cross(stack.row_cosines, stack.col_cosines)
    out = np.full(shape, AIR_HU, dtype=np.float64)
    for index in np.ndindex(*shape):
        p = voxel_lps(affine, np.asarray(index, dtype=np.float64))
        d = [(p - stack.positions_lps[k]) @ normals[k] for k in range(n)]
        for k in range(n - 1):
            if d[k] >= -1e-6 and d[k + 1] <= 1e-6:
                w = d[k] / (d[k] - d[k + 1])
                samples = []
                for j in (k, k + 1):
                    rel = p - stack.positions_lps[j]
                    v = rel @ stack.col_cosines[j] / stack.pixel_spacing_mm[0]
                    u = rel @ stack.row_cosines[j] / stack.pixel_spacing_mm[1]
                    if -0.5 <= v <= rows - 0.5 and -0.5 <= u <= cols - 0.5:
                        samples.append(
                            ndimage.map_coordinates(
                                stack.pixels_hu[j].astype(np.float64), [[v], [u]], order=1, mode="nearest"
                            )[0]
                        )
                    else:
                        samples.append(AIR_HU)
                out[index] = (1 - w) * samples[0] + w * samples[1]
                break
    return out


# ------------------------------------------------------------------------------------------ resample_stack


def test_an_untilted_evenly_spaced_stack_keeps_its_slices_and_interpolates_between_them() -> None:
    stack = make_stack([0.0, 2.0, 4.0, 6.0], spacing=(1.0, 1.0), rows=12, cols=10)
    volume = resample_stack(stack, (1.0, 1.0, 1.0))

    assert volume.array.shape == (7, 12, 10) and volume.array.dtype == np.float32
    assert np.allclose(voxel_lps(volume.affine_lps, np.zeros(3)), stack.positions_lps[0])
    assert np.allclose(volume.affine_lps[:3, :3], np.diag([1.0, 1.0, 1.0])[:, [2, 1, 0]])  # z, y, x axes
    for k in range(4):
        assert np.allclose(volume.array[2 * k], stack.pixels_hu[k], atol=1e-3)
    assert np.allclose(volume.array[1], (stack.pixels_hu[0] + stack.pixels_hu[1]) / 2, atol=1e-3)
    assert volume.sop_instance_uids == stack.sop_instance_uids
    assert list(volume.slice_of_z) == [0, 0, 1, 1, 2, 2, 3]  # ties go to the lower slice
    assert volume.spacing_mm == (1.0, 1.0, 1.0)


def test_uneven_spacing_is_interpolated_linearly_by_distance() -> None:
    zs = [0.0, 1.0, 3.0, 7.0, 8.0]
    stack = make_stack(zs, content=lambda p: 10.0 * p[..., 2] + 5.0)  # HU grows linearly along z
    volume = resample_stack(stack, (0.5, 2.0, 2.0))

    t = np.arange(volume.array.shape[0]) * 0.5
    assert volume.array.shape[0] == 17
    # Linear interpolation of a linear function is exact, whatever the gaps.
    assert np.allclose(volume.array[:, 10, 10], 10.0 * t + 5.0, atol=1e-3)
    expected_nearest = np.abs(t[:, None] - np.asarray(zs)[None, :]).argmin(axis=1)
    assert list(volume.slice_of_z) == list(expected_nearest)


def test_a_tilted_stack_puts_a_sphere_where_its_lps_coordinates_say() -> None:
    centre = np.array([10.0, -15.0, 12.0])  # off-centre along z, where ignoring the shear would misplace it

    def sphere(p: np.ndarray) -> np.ndarray:
        return np.where(np.linalg.norm(p - centre, axis=-1) <= 15.0, 100.0, 0.0)

    stack = make_stack(np.arange(-24.0, 40.0, 3.0), 20.0, rows=64, cols=64, spacing=(1.5, 1.5), content=sphere)
    volume = resample_stack(stack, (1.0, 1.0, 1.0))

    inside = np.argwhere(volume.array > 50.0).astype(np.float64)
    found = voxel_lps(volume.affine_lps, inside.mean(axis=0))
    assert np.linalg.norm(found - centre) < 1.0, found
    assert inside.shape[0] == pytest.approx(4 / 3 * math.pi * 15.0**3, rel=0.1)
    # Axis 0 follows the tilted normal, so output planes are parallel to the source slices.
    normal = volume.affine_lps[:3, 0]
    assert math.degrees(math.acos(normal @ [0.0, 0.0, 1.0])) == pytest.approx(20.0, abs=1e-6)


def test_a_variably_tilted_unevenly_spaced_stack_puts_the_sphere_in_place() -> None:
    centre = np.array([-8.0, 28.0, 16.0])  # far from the stack centre, where shear errors would show

    def sphere(p: np.ndarray) -> np.ndarray:
        return np.where(np.linalg.norm(p - centre, axis=-1) <= 12.0, 100.0, 0.0)

    zs = [-30.0, -26.0, -21.0, -18.0, -12.0, -9.0, -4.0, -2.0, 3.0, 7.0, 10.0, 15.0, 18.0, 24.0, 27.0, 33.0]
    tilts = np.linspace(0.0, 15.0, len(zs))
    stack = make_stack(zs, tilts, rows=64, cols=64, spacing=(1.5, 1.5), content=sphere)
    volume = resample_stack(stack, (1.0, 1.0, 1.0))

    inside = np.argwhere(volume.array > 50.0).astype(np.float64)
    found = voxel_lps(volume.affine_lps, inside.mean(axis=0))
    assert np.linalg.norm(found - centre) < 1.0, found
    assert inside.shape[0] == pytest.approx(4 / 3 * math.pi * 12.0**3, rel=0.1)


def test_resampling_matches_a_voxel_by_voxel_statement_of_the_rule() -> None:
    # Random content, uneven gaps and a tilt that changes per slice: every voxel, including those outside the
    # sheared fields of view (air), must match the slow reference.
    stack = make_stack([0.0, 3.0, 4.0, 9.0], [10.0, 13.0, 14.0, 18.0], rows=14, cols=12, spacing=(2.0, 2.5))
    volume = resample_stack(stack, (1.5, 2.0, 2.0))
    expected = reference_resample(stack, volume.affine_lps, volume.array.shape)
    assert np.allclose(volume.array, expected, atol=1e-3)
    assert np.any(volume.array == AIR_HU)  # the shear leaves corners of the grid outside every slice


def test_chunking_does_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    import triage.pipelines.transforms as transforms

    stack = make_stack([0.0, 3.0, 4.0, 9.0, 15.0], [10.0, 13.0, 14.0, 18.0, 20.0], rows=30, cols=26)
    whole = resample_stack(stack, (1.0, 1.0, 1.0)).array
    monkeypatch.setattr(transforms, "_CHUNK_VOXELS", 100)  # a few rows per chunk
    monkeypatch.setattr(transforms, "_CHUNK_ELEMENTS", 150)
    assert np.array_equal(resample_stack(stack, (1.0, 1.0, 1.0)).array, whole)


def test_the_grid_spans_the_stack_and_covers_every_source_pixel_in_plane() -> None:
    stack = make_stack([0.0, 4.0, 8.0, 20.0], 15.0, rows=20, cols=16, spacing=(2.0, 2.0))
    volume = resample_stack(stack, (1.0, 1.0, 1.0))
    inverse = np.linalg.inv(volume.affine_lps)
    n, rows, cols = stack.pixels_hu.shape
    for k in range(n):
        for i, j in [(0, 0), (0, cols - 1), (rows - 1, 0), (rows - 1, cols - 1)]:
            p = stack.positions_lps[k] + j * 2.0 * stack.row_cosines[k] + i * 2.0 * stack.col_cosines[k]
            index = inverse[:3, :3] @ p + inverse[:3, 3]
            assert np.all(index > -1e-6), (k, i, j, index)
            assert np.all(index[1:] < np.array(volume.array.shape[1:]) - 1 + 1e-6), (k, i, j, index)
            # Along the normal the grid stops within one spacing of the last plane.
            assert index[0] < volume.array.shape[0], (k, i, j, index)
    assert volume.array.shape[0] == 20  # 20 * cos(15 deg) = 19.3 mm from the first plane to the last


def test_bad_spacing_is_quoted() -> None:
    stack = make_stack([0.0, 2.0])
    with pytest.raises(ValueError, match=r"\[1\.0, 0\.0, 1\.0\]"):
        resample_stack(stack, (1.0, 0.0, 1.0))


# ------------------------------------------------------------------------------------------ MONAI transforms


def test_resample_stackd_gives_a_meta_tensor_with_lps_geometry_and_passes_other_keys() -> None:
    stack = make_stack([0.0, 2.0, 5.0], 12.0)
    out = ResampleStackd(IMAGE_KEY, spacing_mm=(1.0, 2.0, 2.0))({IMAGE_KEY: stack, "accession": "A1"})

    image = out[IMAGE_KEY]
    assert isinstance(image, MetaTensor)
    assert image.ndim == 4 and image.shape[0] == 1 and image.dtype == torch.float32
    assert np.allclose(image.affine.numpy(), image.meta[AFFINE_LPS_META])
    assert str(image.meta["space"]) == "LPS"
    assert image.meta[SOP_UIDS_META] == stack.sop_instance_uids
    assert len(image.meta[SLICE_OF_Z_META]) == image.shape[1]
    assert image.meta[SPACING_META] == (1.0, 2.0, 2.0)
    assert image.meta[CROP_BOX_META] == (0, image.shape[1], 0, image.shape[2], 0, image.shape[3])
    assert out["accession"] == "A1"


def test_resample_stackd_refuses_something_that_is_not_a_slice_stack() -> None:
    with pytest.raises(TypeError, match=r"SliceStack.*ndarray"):
        ResampleStackd(IMAGE_KEY)({IMAGE_KEY: np.zeros((2, 4, 4))})


def _blob_volume() -> MetaTensor:
    """A 'head' (large ball) and a 'table' (small separate slab) in air, on a 2 mm grid."""
    hu = np.full((30, 40, 50), AIR_HU, dtype=np.float32)
    zz, yy, xx = np.mgrid[:30, :40, :50]
    hu[(zz - 15) ** 2 + (yy - 18) ** 2 + (xx - 20) ** 2 <= 8**2] = 40.0
    hu[10:20, 36:38, 5:45] = 200.0  # the table: fewer voxels than the head
    affine = np.array([[0, 0, 2.0, -50], [0, 2.0, 0, -40], [2.0, 0, 0, -30], [0, 0, 0, 1]])
    meta = {
        AFFINE_LPS_META: affine,
        SLICE_OF_Z_META: np.arange(30) // 3,
        SPACING_META: (2.0, 2.0, 2.0),
        CROP_BOX_META: (0, 30, 0, 40, 0, 50),
    }
    return MetaTensor(torch.from_numpy(hu[None]), affine=torch.as_tensor(affine), meta=meta)


def test_crop_head_keeps_the_largest_region_with_its_margin_and_maps_back() -> None:
    image = _blob_volume()
    label = MetaTensor(torch.zeros_like(image), meta=dict(image.meta))
    out = CropHeadd([IMAGE_KEY, "label"], source_key=IMAGE_KEY, threshold_hu=-300, margin_mm=4)(
        {IMAGE_KEY: image, "label": label, "other": 1}
    )
    cropped = out[IMAGE_KEY]
    # The ball spans 7..23 in z, 10..26 in y and 12..28 in x; 4 mm margin = 2 voxels each side.
    assert cropped.meta[CROP_BOX_META] == (5, 26, 8, 29, 10, 31)
    assert cropped.shape == (1, 21, 21, 21)
    assert out["label"].shape == cropped.shape and out["other"] == 1
    original = image.meta[AFFINE_LPS_META]
    assert np.allclose(cropped.meta[AFFINE_LPS_META] @ [0, 0, 0, 1], original @ [5, 8, 10, 1])
    assert np.allclose(cropped.affine.numpy(), cropped.meta[AFFINE_LPS_META])
    assert list(cropped.meta[SLICE_OF_Z_META]) == list((np.arange(30) // 3)[5:26])
    assert float(cropped.max()) == 40.0  # the table is gone


def test_crop_head_of_an_empty_volume_says_there_is_nothing_to_crop() -> None:
    image = _blob_volume()
    image[:] = AIR_HU
    with pytest.raises(InvalidStudyError, match=r"no voxel above -300 HU"):
        CropHead(threshold_hu=-300, margin_mm=5)(image)


def test_window_hu_clips_and_scales_linearly() -> None:
    hu = torch.tensor([[-1000.0, -15.0, 42.5, 100.0, 2000.0]])
    assert torch.allclose(WindowHU((-15, 100), (-1, 1))(hu), torch.tensor([[-1.0, -1.0, 0.0, 1.0, 1.0]]))
    out = WindowHUd(IMAGE_KEY, window_hu=(0, 80), output_range=(0, 1))({IMAGE_KEY: hu, "x": "kept"})
    assert torch.allclose(out[IMAGE_KEY], torch.tensor([[0.0, 0.0, 42.5 / 80, 1.0, 1.0]]))
    assert out["x"] == "kept"


def test_window_hu_refuses_an_empty_window() -> None:
    with pytest.raises(ValueError, match=r"window_hu.*\(100, 100\)"):
        WindowHU((100, 100))


# ------------------------------------------------------------------------------------- build_ct_preprocess


def test_build_ct_preprocess_names_missing_card_keys() -> None:
    with pytest.raises(ModelLoadError, match=r"lacks \['window_hu', 'crop_margin_mm'\]"):
        build_ct_preprocess({k: v for k, v in PREPROCESSING.items() if k not in ("window_hu", "crop_margin_mm")})


def test_build_ct_preprocess_quotes_a_malformed_value() -> None:
    with pytest.raises(ModelLoadError, match=r"spacing_mm.*\[1, 1\]"):
        build_ct_preprocess({**PREPROCESSING, "spacing_mm": [1, 1]})


def test_build_ct_preprocess_on_a_synthetic_head() -> None:
    def head(p: np.ndarray) -> np.ndarray:
        r = np.linalg.norm(p / [60.0, 70.0, 50.0], axis=-1)
        return np.select([r <= 0.9, r <= 1.0], [35.0, 1000.0], AIR_HU)

    stack = make_stack(np.arange(-60.0, 61.0, 5.0), 10.0, rows=80, cols=80, spacing=(2.0, 2.0), content=head)
    out = build_ct_preprocess(PREPROCESSING)({IMAGE_KEY: stack, "study": "1.2.3"})

    image, hu = out[IMAGE_KEY], out[IMAGE_HU_KEY]
    assert image.shape == hu.shape and image.shape[0] == 1
    assert image.dtype == torch.float32 and hu.dtype == torch.float32
    assert float(image.min()) >= -1.0 and float(image.max()) <= 1.0
    assert float(hu.max()) == pytest.approx(1000.0, abs=1.0)  # HU kept, not windowed
    z0, z1, y0, y1, x0, x1 = image.meta[CROP_BOX_META]
    assert (z1 - z0, y1 - y0, x1 - x0) == tuple(image.shape[1:])
    full = resample_stack(stack, (1.0, 1.0, 1.0))
    assert image.shape[2] < full.array.shape[1] and image.shape[3] < full.array.shape[2]
    assert np.allclose(image.meta[AFFINE_LPS_META], full.affine_lps @ _shift(z0, y0, x0))
    assert np.array_equal(image.meta[SLICE_OF_Z_META], full.slice_of_z[z0:z1])
    assert hu.meta[CROP_BOX_META] == image.meta[CROP_BOX_META]
    # The windowed image is the HU image through the window: 35 HU brain -> (35 + 15) / 115 * 2 - 1.
    centre = tuple(s // 2 for s in image.shape[1:])
    assert float(hu[0][centre]) == pytest.approx(35.0, abs=0.5)
    assert float(image[0][centre]) == pytest.approx((35.0 + 15.0) / 115.0 * 2 - 1, abs=0.01)
    assert out["study"] == "1.2.3"
    # What passes between pipeline stages must pickle (Ray moves it between processes).
    again = pickle.loads(pickle.dumps(out))
    assert torch.equal(again[IMAGE_KEY], image) and again[IMAGE_KEY].meta[CROP_BOX_META] == image.meta[CROP_BOX_META]


def _shift(z: int, y: int, x: int) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = (z, y, x)
    return shift


# ------------------------------------------------------------------------------------------- real head CT


@pytest.fixture(scope="module")
def real_head() -> tuple[SliceStack, dict]:
    for folder in REAL_HEAD_CT:
        files = sorted(folder.glob("*.dcm"))
        if files:
            stack = read_ct_stack(files)
            return stack, build_ct_preprocess(PREPROCESSING)({IMAGE_KEY: stack})
    pytest.skip(f"the GE head CT is in neither {[str(p) for p in REAL_HEAD_CT]}")


def test_real_head_ct_resamples_to_1mm_with_plausible_hu(real_head: tuple[SliceStack, dict]) -> None:
    stack, out = real_head
    image, hu = out[IMAGE_KEY], out[IMAGE_HU_KEY][0].numpy()
    full_shape = image.meta["resampled_shape"]
    # 28 slices, 4 and 7 mm apart (1.08 once) along an 18.5-degree tilted normal: about 144 mm of head.
    assert full_shape[0] == 145
    assert image.meta[SPACING_META] == (1.0, 1.0, 1.0)
    assert np.allclose(np.linalg.norm(image.meta[AFFINE_LPS_META][:3, :3], axis=0), 1.0)
    # The crop is smaller than the field and still holds the whole head.
    assert np.prod(image.shape[1:]) < 0.75 * np.prod(full_shape)
    assert all(c <= f for c, f in zip(image.shape[1:], full_shape, strict=True))
    # HU: air about -1000, brain 20-45 HU inside the head.
    assert -1024.0 <= np.median(hu[hu < -500]) <= -950.0
    head = ndimage.binary_erosion(ndimage.binary_fill_holes(hu > -300), iterations=10)
    soft = hu[head & (hu > -100) & (hu < 100)]
    assert 20.0 <= float(np.median(soft)) <= 45.0
    # Every resampled plane names a real source slice.
    assert set(image.meta[SLICE_OF_Z_META]) <= set(range(28))
    assert image.meta[SOP_UIDS_META] == stack.sop_instance_uids
