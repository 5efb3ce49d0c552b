"""Preview rendering: brain window, overlay upsampling by stride, contour and the burnt-in caption."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.dicom_factory import make_ct_series, write_dataset
from triage.dicom.overlay import draw_overlay, mask_on_image
from triage.domain import Overlay
from triage.errors import NotFoundError
from triage.storage import LocalStore, overlay_bytes
from triage.worklist.preview import load_overlay, read_preview_image


def test_ct_is_shown_in_the_brain_window(tmp_path: Path) -> None:
    ds = make_ct_series(n_slices=1, rows=16, columns=16, noise_hu=0.0)[0]
    hu = np.zeros((16, 16), dtype=np.float32)
    hu[:, 4:] = 40.0
    hu[:, 8:] = 80.0
    hu[:, 12:] = 1000.0
    hu[0, 0] = -1000.0
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    ds.PixelData = np.round((hu - intercept) / slope).astype(np.int16).tobytes()
    ds.PixelRepresentation = 1
    image = read_preview_image(write_dataset(ds, tmp_path / "ct.dcm"))
    assert image.kind == "ct" and image.sop_instance_uid == str(ds.SOPInstanceUID)
    # 0 HU and below black, 40 HU mid-grey, 80 HU and above white.
    assert image.grey[1, 0] == 0 and image.grey[0, 0] == 0
    assert abs(int(image.grey[1, 5]) - 128) <= 1
    assert image.grey[1, 9] == 255 and image.grey[1, 13] == 255


def test_mask_is_upsampled_by_its_stride_and_fitted_to_the_image() -> None:
    mask = np.zeros((4, 5), dtype=np.float32)
    mask[1:3, 1:3] = 1.0
    on_image = mask_on_image(Overlay("1.2", mask, stride=4), (18, 18))
    assert on_image.shape == (18, 18)
    assert on_image[6:10, 6:10].min() == 1.0  # the centre of the marked cells
    assert on_image[:2, :].max() == 0.0 and on_image[14:, :].max() == 0.0


def test_overlay_is_red_with_a_contour_and_leaves_the_rest_grey() -> None:
    grey = np.full((600, 600), 100, dtype=np.uint8)
    mask = np.zeros((600, 600), dtype=np.float32)
    mask[200:400, 200:400] = 1.0
    rgb = draw_overlay(grey, mask)
    assert tuple(rgb[300, 300]) != (100, 100, 100) and rgb[300, 300, 0] > rgb[300, 300, 1] + 60
    assert tuple(rgb[50, 50]) == (100, 100, 100)
    edge = rgb[200, 300]
    assert edge[0] == 255 and edge[1] < 60  # the solid contour


def test_overlay_files_outside_the_study_folder_are_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "dicom", tmp_path / "overlays")
    (tmp_path / "overlays" / "1.2").mkdir(parents=True)
    np.savez(tmp_path / "overlays" / "secret.npz", mask=np.zeros((2, 2)), stride=1, sop_instance_uid="x", kind="mask")
    with pytest.raises(NotFoundError):
        load_overlay(store, "1.2", "../secret.npz")
    with pytest.raises(NotFoundError):
        load_overlay(store, "1.2", "missing.npz")
    with pytest.raises(NotFoundError):
        load_overlay(store, "..", "secret.npz")


def test_an_overlay_round_trips_through_the_store(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "dicom", tmp_path / "overlays")
    mask = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    store.put_overlay("1.2", "m-label.npz", overlay_bytes(Overlay("1.2.3", mask, stride=2, kind="heatmap")))
    back = load_overlay(store, "1.2", "m-label.npz")
    assert (back.sop_instance_uid, back.stride, back.kind) == ("1.2.3", 2, "heatmap")
    np.testing.assert_array_equal(back.mask, mask)
