"""The study page's image scroller: a series' images in slice order, in the brain, subdural or bone window, with
the AI segmentation drawn on the images it covers (and off on request), and the "open in viewer" link."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from serve_site import Site, ich_finding

from triage.domain import SliceMasks
from triage.storage import segmentation_bytes


def red_pixels(png: bytes) -> int:
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int(((rgb[..., 0] > rgb[..., 1] + 60) & (rgb[..., 0] > rgb[..., 2] + 60)).sum())


def test_the_scroller_orders_the_slices_windows_them_and_draws_the_ai_region(site: Site) -> None:
    site.service.settings.viewer_url_template = "https://ohif.example.org/viewer?StudyInstanceUIDs={study_uid}"
    site.sign_in()
    study_uid, datasets = site.add_ct("ACC-VIEW")
    series_uid = str(datasets[0].SeriesInstanceUID)
    by_position = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    masked = by_position[2]
    mask = np.zeros((1, int(masked.Rows), int(masked.Columns)), dtype=bool)
    mask[0, 8:20, 8:20] = True
    site.service.files.put_overlay(
        study_uid, "seg.npz", segmentation_bytes(SliceMasks([str(masked.SOPInstanceUID)], mask))
    )
    finding = ich_finding(str(masked.SOPInstanceUID), series_uid, None) | {"segmentation_file": "seg.npz"}
    site.finish(study_uid, [finding])

    listing = site.client.get(f"/api/v1/studies/{study_uid}/series/{series_uid}/slices").json()
    assert listing["sop_instance_uids"] == [str(ds.SOPInstanceUID) for ds in by_position]
    base = f"/api/v1/studies/{study_uid}/series/{series_uid}/slices"
    drawn = site.client.get(f"{base}/2.png?window=brain")
    assert drawn.status_code == 200 and drawn.headers["content-type"] == "image/png"
    assert red_pixels(drawn.content) > 100
    assert red_pixels(site.client.get(f"{base}/2.png?overlay=false").content) < red_pixels(drawn.content) // 10
    assert red_pixels(site.client.get(f"{base}/0.png").content) < red_pixels(drawn.content) // 10
    brain = np.asarray(Image.open(io.BytesIO(site.client.get(f"{base}/2.png?window=brain&overlay=false").content)))
    bone = np.asarray(Image.open(io.BytesIO(site.client.get(f"{base}/2.png?window=bone&overlay=false").content)))
    assert not np.array_equal(brain, bone)
    assert site.client.get(f"{base}/2.png?window=lung").status_code == 400
    assert site.client.get(f"{base}/99.png").status_code == 404
    page = site.client.get(f"/studies/{study_uid}").text
    assert 'id="viewer-series"' in page and f"https://ohif.example.org/viewer?StudyInstanceUIDs={study_uid}" in page
