"""One overlay renderer: the study page's preview and the capture sent to PACS show the same picture."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from tests.dicom_factory import make_ct_series, write_dataset
from triage.dicom.overlay import display_image, render_overlay
from triage.dicom.results import build_overlay_capture
from triage.domain import Overlay
from triage.worklist.preview import read_preview_image, render_png


def test_the_preview_and_the_pacs_capture_draw_the_same_region_the_same_way(tmp_path: Path) -> None:
    ds = make_ct_series(n_slices=1, rows=512, columns=512)[0]
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[20:30, 24:40] = 1.0
    capture = build_overlay_capture(ds, mask, 8, "ct-head-ich 1.0.0: ICH p=0.91")
    png = render_png(read_preview_image(write_dataset(ds, tmp_path / "ct.dcm")), Overlay(ds.SOPInstanceUID, mask, 8))
    preview = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    sent = capture.pixel_array
    # Both put the warning band on top; below it, pixel for pixel the same image (a 512 px slice is not rescaled).
    assert preview.shape == sent.shape == (sent.shape[0], 512, 3)
    band = sent.shape[0] - 512
    assert np.array_equal(preview[band:], sent[band:])
    red = (sent[band:, :, 0].astype(int) - sent[band:, :, 1]) > 60
    assert red[20 * 8 : 30 * 8, 24 * 8 : 40 * 8].all() and red.sum() < (12 * 8) * (18 * 8)


def test_a_small_slice_is_enlarged_for_the_page_only() -> None:
    ds = make_ct_series(n_slices=1, rows=64, columns=64)[0]
    image = display_image(ds)
    page, _ = render_overlay(image, None, ["x"], fit_px=(512, 768))
    native, _ = render_overlay(image, None, ["x"])
    assert page.shape[1] == 512 and native.shape[1] == 64
