"""Radiograph reading: LUT order, MONOCHROME1 inversion, compressed syntaxes, spacing, and clear errors."""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import apply_voi_lut
from pydicom.sequence import Sequence as DicomSequence

from triage.dicom.radiograph import read_image_file, read_radiograph, select_radiograph
from triage.errors import InvalidStudyError, UnsupportedInputError
from triage.training.synth_xray import make_chest_radiograph_dataset, synth_chest_radiograph

QUANTUM = 2.0 / 4095  # two 12-bit steps


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return synth_chest_radiograph(3, True, (96, 80)).image


def _write(ds: Dataset, tmp_path, name: str = "x.dcm"):
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_monochrome1_and_monochrome2_present_the_same_picture(image, tmp_path) -> None:
    m2 = read_radiograph(_write(make_chest_radiograph_dataset(1, image=image), tmp_path, "m2.dcm"))
    m1 = read_radiograph(
        _write(make_chest_radiograph_dataset(1, image=image, photometric="MONOCHROME1"), tmp_path, "m1.dcm")
    )
    assert m1.photometric == "MONOCHROME1" and m2.photometric == "MONOCHROME2"
    assert m1.pixels.dtype == np.float32 and m1.pixels.shape == (96, 80)
    np.testing.assert_allclose(m1.pixels, m2.pixels, atol=QUANTUM)
    # Bone bright: the spine (centre column) is brighter than the lungs in both.
    for r in (m1, m2):
        assert r.pixels[40:60, 38:42].mean() > r.pixels[40:60, 15:25].mean()


def test_no_voi_falls_back_to_the_image_range(image, tmp_path) -> None:
    plain = read_radiograph(_write(make_chest_radiograph_dataset(1, image=image, window=None), tmp_path))
    assert plain.voi == "minmax"
    assert plain.pixels.min() == 0.0 and plain.pixels.max() == 1.0
    expected = (image - image.min()) / (image.max() - image.min())
    np.testing.assert_allclose(plain.pixels, expected, atol=QUANTUM * 2)


def test_rescale_then_window_is_applied_in_modality_units(image, tmp_path) -> None:
    ds = make_chest_radiograph_dataset(1, image=image, rescale=(2.0, -1000.0), window=None)
    stored = ds.pixel_array.astype(float)
    modality = stored * 2.0 - 1000.0
    centre, width = float(np.percentile(modality, 50)), float(np.ptp(modality) / 2)
    ds.WindowCenter, ds.WindowWidth = [f"{centre:.1f}", "99999"], [f"{width:.1f}", "1"]  # the first pair applies
    got = read_radiograph(_write(ds, tmp_path)).pixels
    # LINEAR (PS3.3 C.11.2.1.2.1) with c-0.5 and w-1, clipped, to [0, 1].
    c, w = round(centre, 1) - 0.5, round(width, 1) - 1
    expected = np.clip((modality - c) / w + 0.5, 0, 1)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert (got == 0).any() and (got == 1).any()


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_function_is_honoured(image, tmp_path, function) -> None:
    ds = make_chest_radiograph_dataset(1, image=image, window=(2000.0, 1500.0))
    ds.VOILUTFunction = function
    got = read_radiograph(_write(ds, tmp_path)).pixels
    x = ds.pixel_array.astype(float)
    if function == "SIGMOID":
        expected = 1 / (1 + np.exp(-4 * (x - 2000.0) / 1500.0))
    else:
        expected = np.clip((x - 2000.0) / 1500.0 + 0.5, 0, 1)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_voi_lut_sequence_wins_over_the_window(image, tmp_path) -> None:
    ds = make_chest_radiograph_dataset(1, image=image, bits_stored=12, window=(100.0, 10.0))
    item = Dataset()
    # An inverting 4096-entry LUT with 16-bit output: stored 0 -> 65535, stored 4095 -> 0.
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new("LUTData", "US", [int(round(65535 * (1 - i / 4095))) for i in range(4096)])
    ds.VOILUTSequence = DicomSequence([item])
    got = read_radiograph(_write(ds, tmp_path))
    assert got.voi == "lut"
    expected = np.round(65535 * (1 - ds.pixel_array / 4095)) / 65535
    np.testing.assert_allclose(got.pixels, expected, atol=1e-6)


def test_modality_lut_sequence_is_applied(image, tmp_path) -> None:
    ds = make_chest_radiograph_dataset(1, image=image, bits_stored=12, window=None)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "US"
    item.add_new("LUTData", "US", [int((i / 4095) ** 2 * 65535) for i in range(4096)])  # non-linear
    ds.ModalityLUTSequence = DicomSequence([item])
    got = read_radiograph(_write(ds, tmp_path)).pixels
    squared = (ds.pixel_array / 4095.0) ** 2
    expected = (squared - squared.min()) / (squared.max() - squared.min())
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_real_monochrome1_chest_radiograph() -> None:
    # RG1_UNCI: a CR chest PA from the pydicom test data, MONOCHROME1 with a window.
    radiograph = read_radiograph(get_testdata_file("RG1_UNCI.dcm"))
    assert radiograph.photometric == "MONOCHROME1" and radiograph.voi == "window"
    assert radiograph.view_position == "PA"
    assert radiograph.pixel_spacing_mm is None  # Pixel Spacing is 0\0 in this file: not a usable spacing
    px = radiograph.pixels
    rows, cols = px.shape
    spine = px[rows // 3 : rows // 2, cols // 2 - 20 : cols // 2 + 20].mean()
    right_lung = px[rows // 3 : rows // 2, cols // 4 - 40 : cols // 4 + 40].mean()
    assert spine > right_lung + 0.1  # after inversion the mediastinum is bright, the aerated lung dark


def test_real_voi_lut_file_matches_pydicom() -> None:
    path = get_testdata_file("vlut_04.dcm")
    ds = pydicom.dcmread(path)
    expected = apply_voi_lut(ds.pixel_array, ds).astype(float)
    got = read_radiograph(path)
    assert got.voi == "lut"
    np.testing.assert_allclose(got.pixels, (expected - expected.min()) / np.ptp(expected), atol=1e-6)


def test_lossy_jpeg2000_reads_like_the_uncompressed_original() -> None:
    uncompressed = read_radiograph(get_testdata_file("RG1_UNCI.dcm")).pixels
    j2k = read_radiograph(get_testdata_file("RG1_J2KI.dcm")).pixels
    assert j2k.shape == uncompressed.shape
    assert np.abs(j2k - uncompressed).mean() < 0.01


@pytest.mark.parametrize("compression", ["rle", "jpegls", "jpeg2000"])
def test_lossless_syntaxes_decode_exactly(image, tmp_path, compression) -> None:
    plain = read_radiograph(_write(make_chest_radiograph_dataset(2, image=image), tmp_path, "plain.dcm"))
    ds = make_chest_radiograph_dataset(2, image=image, compression=compression)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    packed = read_radiograph(_write(ds, tmp_path, f"{compression}.dcm"))
    np.testing.assert_array_equal(packed.pixels, plain.pixels)


@pytest.mark.parametrize("sop_class", ["DX", "DX-PROCESSING", "CR", "SC"])
def test_each_radiograph_sop_class_is_read_with_its_spacing(image, tmp_path, sop_class) -> None:
    ds = make_chest_radiograph_dataset(4, image=image, sop_class=sop_class, view="AP")
    got = read_radiograph(_write(ds, tmp_path))
    assert got.sop_instance_uid == ds.SOPInstanceUID
    assert got.view_position == "AP"
    assert got.pixel_spacing_mm == pytest.approx((430.0 / 96, 430.0 / 96), abs=1e-3)


def test_no_pixel_data_is_an_invalid_study(image, tmp_path) -> None:
    ds = make_chest_radiograph_dataset(1, image=image)
    del ds.PixelData
    with pytest.raises(InvalidStudyError, match="no pixel data"):
        read_radiograph(_write(ds, tmp_path))


def test_truncated_pixel_data_is_an_invalid_study(image, tmp_path) -> None:
    ds = make_chest_radiograph_dataset(1, image=image)
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(InvalidStudyError, match="cannot be decoded"):
        read_radiograph(_write(ds, tmp_path))


def test_not_dicom_is_an_invalid_study(tmp_path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("not an image")
    with pytest.raises(InvalidStudyError, match="notes.dcm"):
        read_radiograph(path)


@pytest.mark.parametrize(("name", "message"), [("emri_small.dcm", "NumberOfFrames=10"), ("SC_rgb.dcm", "'RGB'")])
def test_multiframe_and_colour_are_unsupported(name, message) -> None:
    with pytest.raises(UnsupportedInputError, match=message):
        read_radiograph(get_testdata_file(name))


def test_png_8_and_16_bit(image, tmp_path) -> None:
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.round(image * 65535).astype(np.uint16)).save(tmp_path / "b.png")
    a, b = read_image_file(tmp_path / "a.png"), read_image_file(tmp_path / "b.png")
    assert a.sop_instance_uid == "a" and a.pixel_spacing_mm is None
    np.testing.assert_allclose(a.pixels, image, atol=1 / 255)
    np.testing.assert_allclose(b.pixels, image, atol=1 / 65535)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(UnsupportedInputError, match="colour PNG"):
        read_image_file(tmp_path / "c.png")


def test_the_first_frontal_view_is_chosen(image, tmp_path) -> None:
    lateral = make_chest_radiograph_dataset(1, image=image, view="LL")
    frontal = copy.deepcopy(lateral)
    frontal.ViewPosition = "AP"
    frontal.SOPInstanceUID = pydicom.uid.generate_uid()
    paths = [_write(lateral, tmp_path, "1.dcm"), _write(frontal, tmp_path, "2.dcm")]
    chosen, reason = select_radiograph(paths)
    assert chosen == paths[1] and "AP" in reason
    chosen, reason = select_radiograph([paths[0], paths[0]])
    assert chosen == paths[0] and "no PA/AP" in reason
    with pytest.raises(InvalidStudyError):
        select_radiograph([])
