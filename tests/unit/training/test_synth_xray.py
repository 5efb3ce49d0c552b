"""The synthetic radiograph generator: deterministic, labelled as drawn, and written as real DX/CR DICOM."""

from __future__ import annotations

import csv

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from triage.dicom.radiograph import read_image_file, read_radiograph
from triage.training.synth_xray import (
    SYNTHETIC_PATIENT_NAME,
    generate_dataset,
    siim_rle_decode,
    siim_rle_encode,
    synth_chest_radiograph,
)


def test_same_seed_same_image_and_different_seed_different_image() -> None:
    a = synth_chest_radiograph(5, True, (128, 128))
    b = synth_chest_radiograph(5, True, (128, 128))
    c = synth_chest_radiograph(6, True, (128, 128))
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)
    assert a.image.dtype == np.float32 and a.image.min() >= 0.0 and a.image.max() <= 1.0


def test_positives_have_a_pneumothorax_region_with_no_lung_markings() -> None:
    for seed in range(6):
        positive = synth_chest_radiograph(seed, True, (192, 160))
        negative = synth_chest_radiograph(seed, False, (192, 160))
        assert positive.label == 1 and positive.mask.any()
        assert positive.meta["side"] in ("left", "right") and positive.meta["location"] in ("apical", "lateral")
        assert negative.label == 0 and not negative.mask.any()
        # Same seed: the same patient; beyond the pleural line the markings are gone and the lung is lucent.
        region = positive.mask & ~ndimage.binary_dilation(
            positive.mask ^ ndimage.binary_erosion(positive.mask), iterations=2
        )
        assert (positive.image[region] < negative.image[region]).mean() > 0.9
        far = ~ndimage.binary_dilation(region, iterations=8)
        assert (np.abs(positive.image[far] - negative.image[far]) > 0.02).mean() < 0.01  # the rest is unchanged


def test_rle_round_trip_in_siim_order() -> None:
    mask = np.zeros((6, 5), dtype=bool)
    mask[1:3, 1] = True
    mask[0, 3] = True
    rle = siim_rle_encode(mask)
    # Column-major: column 1 holds flat indices 7, 8; column 3 holds 18. Relative starts: 7 2, then 18-9=9 1.
    assert rle == "7 2 9 1"
    np.testing.assert_array_equal(siim_rle_decode(rle, 6, 5), mask)
    assert siim_rle_encode(np.zeros((4, 4), bool)) == "-1"
    assert not siim_rle_decode("-1", 4, 4).any()
    with pytest.raises(ValueError, match="past the 4x4 image"):
        siim_rle_decode("10 10", 4, 4)


def test_png_dataset_has_balanced_labels(tmp_path) -> None:
    labels_csv = generate_dataset(tmp_path, 10, 0.3, seed=1, fmt="png", size=64)
    rows = list(csv.DictReader(labels_csv.open()))
    assert [r["image"] for r in rows] == [f"img_{i:05d}.png" for i in range(10)]
    assert sum(int(r["label"]) for r in rows) == 3
    image = read_image_file(tmp_path / rows[0]["image"])
    assert image.pixels.shape == (64, 64)


def test_dicom_dataset_is_a_mix_of_real_radiograph_encodings(tmp_path) -> None:
    labels_csv = generate_dataset(tmp_path, 12, 0.5, seed=2, fmt="dicom", size=64)
    rows = list(csv.DictReader(labels_csv.open()))
    seen: dict[str, set] = {"photometric": set(), "modality": set(), "view": set(), "rescale": set()}
    studies = set()
    for row in rows:
        ds = pydicom.dcmread(tmp_path / row["image"])
        assert str(ds.PatientName) == SYNTHETIC_PATIENT_NAME and ds.BodyPartExamined == "CHEST"
        assert "WindowCenter" in ds and "WindowWidth" in ds
        seen["photometric"].add(ds.PhotometricInterpretation)
        seen["modality"].add(ds.Modality)
        seen["view"].add(ds.ViewPosition)
        seen["rescale"].add("RescaleSlope" in ds)
        studies.add(ds.StudyInstanceUID)
        assert read_radiograph(tmp_path / row["image"]).pixels.shape == (64, 64)
    assert seen["photometric"] == {"MONOCHROME1", "MONOCHROME2"}
    assert seen["modality"] == {"DX", "CR"}
    assert seen["view"] <= {"PA", "AP"}
    assert seen["rescale"] == {True, False}
    assert len(studies) == 12


def test_bad_arguments_are_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="positive_fraction=1.5"):
        generate_dataset(tmp_path, 4, 1.5)
    with pytest.raises(ValueError, match="fmt='jpeg'"):
        generate_dataset(tmp_path, 4, fmt="jpeg")  # type: ignore[arg-type]


def test_max_size_gives_several_resolutions_without_changing_labels(tmp_path) -> None:
    fixed = generate_dataset(tmp_path / "fixed", 6, 0.5, seed=3, fmt="png", size=64)
    varied = generate_dataset(tmp_path / "varied", 6, 0.5, seed=3, fmt="png", size=64, max_size=96)
    assert fixed.read_text() == varied.read_text()  # same names, same labels
    shapes = {read_image_file(tmp_path / "varied" / f"img_{i:05d}.png").pixels.shape for i in range(6)}
    assert len(shapes) > 1 and all(64 <= r <= 96 and 64 <= c <= 96 for r, c in shapes)
    with pytest.raises(ValueError, match="max_size=32 is smaller than size=64"):
        generate_dataset(tmp_path, 4, size=64, max_size=32)
