"""Synthetic frontal chest radiographs with and without pneumothorax, as PNG, DICOM or the SIIM-ACR layout.

These images are a stand-in for labelled chest X-rays, which cannot be reached from the build machine. A model
trained on them is a synthetic demonstration model: it is not validated and must not be used on patients.
The generator is deterministic by seed.
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage

GENERATOR_NAME = "triage.training.synth_xray"
GENERATOR_VERSION = "1"
SYNTHETIC_PATIENT_NAME = "SYNTHETIC^XRAY"
FIELD_OF_VIEW_MM = 430.0  # a 43 cm detector

DX_PRESENTATION_SOP = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING_SOP = "1.2.840.10008.5.1.4.1.1.1.1.1"
CR_SOP = "1.2.840.10008.5.1.4.1.1.1"
SECONDARY_CAPTURE_SOP = "1.2.840.10008.5.1.4.1.1.7"


@dataclass
class SynthRadiograph:
    """One generated radiograph.

    Attributes:
        image: float32 (rows, cols) in [0, 1], higher = more attenuation = brighter (bone bright, air dark).
        mask: bool (rows, cols), the pneumothorax region (all False for a negative).
        label: 1 with pneumothorax, else 0.
        meta: how it was drawn (side, location, depth in pixels) for tests and reports.
    """

    image: np.ndarray
    mask: np.ndarray
    label: int
    meta: dict[str, Any]


def synth_chest_radiograph(
    seed: int, positive: bool, shape: tuple[int, int] = (256, 256), rng: np.random.Generator | None = None
) -> SynthRadiograph:
    """Draw one chest-like PA radiograph: body, mediastinum, lungs with vessel markings, ribs, diaphragm, noise.

    A positive has a pneumothorax on one side (apical or lateral, variable depth): a thin visceral pleural line
    and, beyond it, a lucent region without lung markings. Negatives sometimes carry a skin fold, a line that
    mimics the pleural line but has markings on both sides, so that a line alone is not the answer.

    Args:
        seed: the image's seed (ignored when `rng` is given).
        positive: whether to draw a pneumothorax.
        shape: (rows, cols) in pixels.
        rng: a generator to draw from instead of `seed`.
    """
    rng = rng or np.random.default_rng(seed)
    rows, cols = int(shape[0]), int(shape[1])
    if rows < 32 or cols < 32:
        raise ValueError(f"shape {shape} is too small; use at least 32x32 pixels")
    scale = min(rows, cols) / 256.0
    v, u = np.meshgrid(np.linspace(0, 1, rows), np.linspace(0, 1, cols), indexing="ij")

    # Body outline: a wide ellipse with shoulders, soft tissue of random thickness.
    cx = 0.5 + rng.normal(0, 0.015)
    body_a = rng.uniform(0.40, 0.47)
    neck = rng.uniform(0.08, 0.11)
    shoulder = np.clip((v - 0.03) / rng.uniform(0.10, 0.16), 0.0, 1.0)
    half_width = neck + (body_a - neck) * np.sin(shoulder * np.pi / 2) ** 0.5
    half_width = half_width * (1.0 - 0.08 * np.clip((v - 0.75) / 0.25, 0.0, 1.0))  # tapering to the waist
    body = (np.abs(u - cx) < half_width) & (v > 0.0)
    body = ndimage.gaussian_filter(body.astype(np.float32), 2.0 * scale)
    soft = rng.uniform(0.45, 0.6)
    image = soft * body

    # Lungs, apex to diaphragm; the heart widens the left lung's medial border (image right on a PA film).
    apex = rng.uniform(0.10, 0.17)
    base = rng.uniform(0.74, 0.82)
    lungs = np.zeros((rows, cols), dtype=bool)
    lung_side: dict[int, np.ndarray] = {}
    inner_edge: dict[int, np.ndarray] = {}
    diaphragm: dict[int, np.ndarray] = {}
    heart = rng.uniform(0.08, 0.14)
    for side in (-1, 1):
        t = np.clip((v - apex) / (base - apex), 0.0, 1.0)
        outer = rng.uniform(0.07, 0.09) + rng.uniform(0.26, 0.32) * t**0.5
        inner = 0.045 + 0.03 * t + (heart * np.exp(-((t - 0.75) ** 2) / 0.05) if side == 1 else 0.02 * t)
        lateral = side * (u - cx)
        half_width = np.maximum(outer - inner, 1e-3)
        dome = base + (0.03 if side == 1 else 0.0) - 0.07 * (1 - ((lateral - inner) / half_width - 0.5) ** 2 * 4)
        mask = (lateral > inner) & (lateral < outer) & (v > apex) & (v < dome)
        lung_side[side] = mask
        inner_edge[side] = inner
        diaphragm[side] = dome
        lungs |= mask
    lung_soft = ndimage.gaussian_filter(lungs.astype(np.float32), 1.2 * scale)
    image -= rng.uniform(0.28, 0.38) * lung_soft

    # Spine and mediastinum: a brighter vertical band.
    spine = np.exp(-(((u - cx) / rng.uniform(0.025, 0.035)) ** 2)) * (v > 0.05)
    image += rng.uniform(0.08, 0.15) * spine

    # Pneumothorax region: lung within a varying depth of the lateral/apical chest wall.
    ptx = np.zeros((rows, cols), dtype=bool)
    line = np.zeros((rows, cols), dtype=bool)
    meta: dict[str, Any] = {"positive": bool(positive)}
    # The pneumothorax draws from its own stream, so the same seed gives the same anatomy with or without it.
    ptx_rng = np.random.default_rng(int(rng.integers(2**62)))
    if positive:
        side = int(ptx_rng.choice([-1, 1]))
        location = str(ptx_rng.choice(["apical", "lateral"]))
        lateral = side * (u - cx)
        wall = (~lung_side[side]) & (lateral > inner_edge[side] + 0.01) & (v < diaphragm[side] - 0.02)
        dist = ndimage.distance_transform_edt(~wall)
        depth_px = ptx_rng.uniform(0.025, 0.11) * cols
        span = base - apex
        centre = apex + (ptx_rng.uniform(0.0, 0.12) if location == "apical" else ptx_rng.uniform(0.3, 0.6)) * span
        spread = ptx_rng.uniform(0.12, 0.32) * span
        local_depth = depth_px * np.exp(-((v - centre) ** 2) / (2 * spread**2))
        ptx = lung_side[side] & (dist < local_depth)
        line = lung_side[side] & (np.abs(dist - local_depth) < max(0.7, 0.9 * scale)) & (local_depth > 2.0 * scale)
        meta.update(side="left" if side == 1 else "right", location=location, depth_px=float(depth_px))

    # Lung markings: vessels branching out from each hilum, fading towards the periphery, absent where the lung
    # has collapsed away from the chest wall.
    markings = np.zeros((rows, cols), dtype=np.float32)
    for side in (-1, 1):
        markings += _vessel_tree(rng, rows, cols, cx + side * rng.uniform(0.09, 0.13), rng.uniform(0.40, 0.48), side)
    markings = ndimage.gaussian_filter(markings, 0.8 * scale)
    markings /= max(float(np.percentile(markings[lungs], 99.5)) if lungs.any() else 1.0, 1e-6)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, (rows, cols)).astype(np.float32), 2.0 * scale)
    texture /= max(float(texture.std()), 1e-6)
    lung_detail = rng.uniform(0.07, 0.12) * np.clip(markings, 0, 1.5) + 0.012 * texture
    remaining_lung = lungs & ~ptx
    image += lung_detail * ndimage.gaussian_filter(remaining_lung.astype(np.float32), 0.7 * scale)
    if positive:
        image -= ptx_rng.uniform(0.01, 0.04) * ndimage.gaussian_filter(ptx.astype(np.float32), 0.7 * scale)
        image += ptx_rng.uniform(0.06, 0.12) * ndimage.gaussian_filter(line.astype(np.float32), 0.5 * scale)

    # Ribs: posterior arcs across both hemithoraces, brighter cortex at the edges.
    ribs = np.zeros((rows, cols), dtype=np.float32)
    spacing = rng.uniform(0.065, 0.08)
    width = rng.uniform(0.018, 0.026)
    for k in range(11):
        y0 = apex - 0.03 + k * spacing
        for side in (-1, 1):
            lateral = side * (u - cx)
            arc = y0 + 0.9 * (lateral - 0.05) ** 2 - 0.25 * np.maximum(lateral - 0.3, 0) + 0.12 * lateral
            band = (np.abs(v - arc) < width) & (lateral > 0.03) & (lateral < body_a * 0.95)
            edge = (np.abs(np.abs(v - arc) - width) < 0.004) & (lateral > 0.03) & (lateral < body_a * 0.95)
            ribs += 0.06 * band + 0.04 * edge
    image += rng.uniform(0.7, 1.3) * ndimage.gaussian_filter(ribs, 0.8 * scale)

    # Clavicles.
    for side in (-1, 1):
        lateral = side * (u - cx)
        arc = apex + 0.01 - 0.15 * lateral + 0.6 * (lateral - 0.12) ** 2
        image += 0.08 * ndimage.gaussian_filter(
            ((np.abs(v - arc) < 0.016) & (lateral > 0.03) & (lateral < 0.3)).astype(np.float32), 1.0 * scale
        )

    # A skin fold: a faint curved line over one lung, with markings on both sides (a classic mimic).
    if rng.random() < 0.3:
        side = int(rng.choice([-1, 1]))
        lateral = side * (u - cx)
        offset = rng.uniform(0.18, 0.32)
        curve = offset + 0.08 * np.sin((v - apex) * rng.uniform(2, 4))
        fold = (np.abs(lateral - curve) < 0.003 * max(1.0, 1 / scale)) & lung_side[side]
        image += rng.uniform(0.03, 0.07) * ndimage.gaussian_filter(fold.astype(np.float32), 0.6 * scale)
        meta["skin_fold"] = True

    # Acquisition: blur, a smooth gain field (heel effect, scatter), quantum noise, tone curve.
    image = ndimage.gaussian_filter(image, 0.6 * scale)
    gain = 1.0 + rng.uniform(-0.08, 0.08) * (v - 0.5) + rng.uniform(-0.05, 0.05) * (u - 0.5)
    image = image * gain + rng.uniform(0.02, 0.08)
    image += rng.normal(0, rng.uniform(0.006, 0.02), image.shape)
    image = np.clip(image, 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    return SynthRadiograph(image=image.astype(np.float32), mask=ptx, label=int(positive), meta=meta)


def _vessel_tree(
    rng: np.random.Generator, rows: int, cols: int, hilum_u: float, hilum_v: float, side: int
) -> np.ndarray:
    """Random walks out of a hilum, deposited with weights that fall with path length (thick to thin vessels)."""
    n_walkers = 70
    n_steps = int(0.55 * cols)
    start = np.column_stack([np.full(n_walkers, hilum_v * rows), np.full(n_walkers, hilum_u * cols)]) + rng.normal(
        0, 0.02 * cols, (n_walkers, 2)
    )
    # Directions fan out laterally, up to the apex and down to the bases.
    angle = rng.uniform(-np.pi * 0.85, np.pi * 0.85, n_walkers)
    direction = np.column_stack([np.sin(angle), side * np.cos(angle)])
    delay = rng.integers(0, n_steps // 3, n_walkers)  # later starters: branches that begin further out
    acc = np.zeros((rows, cols), dtype=np.float32)
    position = start.copy()
    heading = np.arctan2(direction[:, 0], direction[:, 1])
    for step in range(n_steps):
        heading += rng.normal(0, 0.12, n_walkers)
        position[:, 0] += np.sin(heading)
        position[:, 1] += np.cos(heading)
        active = step >= delay
        weight = 0.35 + np.exp(-(step - delay) / (0.35 * n_steps))
        r = np.round(position[:, 0]).astype(int)
        c = np.round(position[:, 1]).astype(int)
        ok = active & (r >= 0) & (r < rows) & (c >= 0) & (c < cols)
        np.add.at(acc, (r[ok], c[ok]), weight[ok].astype(np.float32))
    return acc


def make_chest_radiograph_dataset(
    seed: int = 0,
    positive: bool = False,
    shape: tuple[int, int] = (256, 256),
    *,
    photometric: Literal["MONOCHROME1", "MONOCHROME2"] = "MONOCHROME2",
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None | Literal["auto"] = "auto",
    sop_class: Literal["DX", "DX-PROCESSING", "CR", "SC"] = "DX",
    view: str = "PA",
    study_uid: str | None = None,
    series_uid: str | None = None,
    compression: Literal["rle", "jpegls", "jpeg2000"] | None = None,
    bits_stored: int = 12,
    image: np.ndarray | None = None,
) -> Any:
    """Build one synthetic chest radiograph as a pydicom Dataset, as a modality would send it.

    Args:
        seed: seed of the drawn image (and of the UIDs when none are given).
        positive: draw a pneumothorax.
        shape: (rows, cols).
        photometric: MONOCHROME2 stores brighter as larger; MONOCHROME1 stores the inverse.
        rescale: (slope, intercept) to write as Rescale Slope/Intercept, or None for none.
        window: (center, width) in modality-LUT output units, "auto" to cover the image, or None to omit.
        sop_class: DX for presentation, DX for processing, CR, or secondary capture.
        view: View Position.
        study_uid: Study Instance UID (a new one by default).
        series_uid: Series Instance UID (a new one by default).
        compression: encode the pixel data with RLE Lossless, JPEG-LS lossless or JPEG 2000 lossless.
        bits_stored: bits stored (8..16).
        image: an image in [0, 1] to store instead of drawing one (float, higher = brighter).

    Returns:
        A pydicom FileDataset with file meta, ready for `save_as(..., enforce_file_format=True)`.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    if image is None:
        image = synth_chest_radiograph(seed, positive, shape).image
    image = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    rows, cols = image.shape
    max_value = 2**bits_stored - 1
    stored_bright = np.round(image * max_value)
    stored = max_value - stored_bright if photometric == "MONOCHROME1" else stored_bright
    stored = stored.astype(np.uint16 if bits_stored > 8 else np.uint8)

    sop_uid = {"DX": DX_PRESENTATION_SOP, "DX-PROCESSING": DX_PROCESSING_SOP, "CR": CR_SOP}.get(
        sop_class, SECONDARY_CAPTURE_SOP
    )
    uid_seed = f"{seed}-{int(positive)}-{rows}x{cols}-{photometric}-{sop_class}-{view}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_uid)
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, "sop"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)  # type: ignore[arg-type]
    today = dt.date(2024, 1, 1) + dt.timedelta(days=seed % 365)
    ds.SOPClassUID = sop_uid
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid(entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = series_uid or generate_uid(entropy_srcs=[uid_seed, "series"])
    ds.Modality = {"DX": "DX", "DX-PROCESSING": "DX", "CR": "CR"}.get(sop_class, "OT")
    ds.PatientName = SYNTHETIC_PATIENT_NAME
    ds.PatientID = f"SYNTH{seed:06d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = today.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = f"SX{seed:08d}"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST 1 VIEW (SYNTHETIC)"
    ds.SeriesDescription = f"CHEST {view}"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.Manufacturer = "triage synthetic generator"
    ds.ImageType = ["DERIVED", "PRIMARY"] if sop_class != "SC" else ["DERIVED", "SECONDARY"]
    if sop_class == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    elif sop_class == "DX-PROCESSING":
        ds.PresentationIntentType = "FOR PROCESSING"
    if sop_class == "SC":
        ds.ConversionType = "WSD"
    spacing = FIELD_OF_VIEW_MM / max(rows, cols)
    ds.ImagerPixelSpacing = [f"{spacing:.4f}", f"{spacing:.4f}"]
    if sop_class in ("CR", "SC"):
        ds.PixelSpacing = [f"{spacing:.4f}", f"{spacing:.4f}"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16 if bits_stored > 8 else 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    slope, intercept = rescale if rescale is not None else (1.0, 0.0)
    if rescale is not None:
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleType = "US"
    if window == "auto":
        lo = float(stored.min()) * slope + intercept
        hi = float(stored.max()) * slope + intercept
        lo, hi = min(lo, hi), max(lo, hi)
        ds.WindowCenter = f"{(lo + hi) / 2:.1f}"
        ds.WindowWidth = f"{max(hi - lo, 2.0):.1f}"
        ds.VOILUTFunction = "LINEAR"
    elif window is not None:
        ds.WindowCenter = f"{window[0]:g}"
        ds.WindowWidth = f"{window[1]:g}"
    ds.PixelData = stored.tobytes()
    if compression is not None:
        from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

        syntax = {"rle": RLELossless, "jpegls": JPEGLSLossless, "jpeg2000": JPEG2000Lossless}[compression]
        ds.compress(syntax, stored)
    return ds


def generate_dataset(
    out_dir: str | Path,
    n: int,
    positive_fraction: float = 0.5,
    seed: int = 0,
    fmt: Literal["png", "dicom"] = "png",
    size: int = 256,
    max_size: int | None = None,
    institution: str = "",
) -> Path:
    """Write `n` synthetic radiographs and a labels.csv (columns: image, label) into `out_dir`.

    Images are `size` x `size` pixels; with `max_size`, each image's rows are drawn from [size, max_size] and its
    columns from 0.8-1.15 times that (clipped to the range), so that a model sees radiographs of several
    resolutions and aspect ratios resampled by the preprocessing, as it will in service.

    For fmt="dicom" every image is its own DX or CR study (a random mix of MONOCHROME1/2, Window Center/Width,
    some with Rescale Slope/Intercept, PA or AP), named so that storescu can send the folder as it is; with
    `institution`, each carries it as Institution Name (the site the service files it under).

    Returns:
        The path of labels.csv.

    Raises:
        ValueError: for n < 1, a positive fraction outside [0, 1], an unknown format or a size under 32.
    """
    if n < 1:
        raise ValueError(f"n={n}: need at least one image")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction={positive_fraction} must be within [0, 1]")
    if fmt not in ("png", "dicom"):
        raise ValueError(f"fmt={fmt!r}; valid: 'png', 'dicom'")
    if size < 32:
        raise ValueError(f"size={size} is too small; use at least 32")
    if max_size is not None and max_size < size:
        raise ValueError(f"max_size={max_size} is smaller than size={size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = _balanced_labels(n, positive_fraction, seed)
    shapes = _image_shapes(n, size, max_size, seed)
    rows_out: list[tuple[str, int]] = []
    for index in range(n):
        image_seed = seed * 1_000_003 + index
        rng = np.random.default_rng(image_seed)
        drawn = synth_chest_radiograph(image_seed, bool(labels[index]), shapes[index], rng=rng)
        if fmt == "png":
            name = f"img_{index:05d}.png"
            _write_png(out / name, drawn.image)
        else:
            name = f"img_{index:05d}.dcm"
            ds = make_chest_radiograph_dataset(
                image_seed, bool(labels[index]), **_random_dicom_style(rng), image=drawn.image
            )
            if institution:
                ds.InstitutionName = institution
            ds.save_as(out / name, enforce_file_format=True)
        rows_out.append((name, int(labels[index])))
    labels_csv = out / "labels.csv"
    with labels_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label"])
        writer.writerows(rows_out)
    return labels_csv


def _image_shapes(n: int, size: int, max_size: int | None, seed: int) -> list[tuple[int, int]]:
    if max_size is None or max_size == size:
        return [(size, size)] * n
    rng = np.random.default_rng(seed + 104_729)  # its own stream: the images themselves do not change
    rows = rng.integers(size, max_size + 1, n)
    cols = np.clip(np.round(rows * rng.uniform(0.8, 1.15, n)), size, max_size).astype(int)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]


def _balanced_labels(n: int, positive_fraction: float, seed: int) -> np.ndarray:
    n_pos = int(round(n * positive_fraction))
    labels = np.array([1] * n_pos + [0] * (n - n_pos), dtype=int)
    np.random.default_rng(seed + 7919).shuffle(labels)
    return labels


def _random_dicom_style(rng: np.random.Generator) -> dict[str, Any]:
    """How one synthetic modality writes its image: photometric, LUTs, SOP class, view."""
    style: dict[str, Any] = {
        "photometric": str(rng.choice(["MONOCHROME1", "MONOCHROME2"])),
        "sop_class": str(rng.choice(["DX", "CR"])),
        "view": str(rng.choice(["PA", "AP"], p=[0.7, 0.3])),
        "bits_stored": int(rng.choice([12, 14, 16])),
    }
    if rng.random() < 0.4:
        style["rescale"] = (float(rng.choice([0.5, 1.0, 2.0])), float(rng.choice([0.0, -1024.0, 100.0])))
    return style


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.round(np.clip(image, 0, 1) * 65535).astype(np.uint16)).save(path)


def siim_rle_encode(mask: np.ndarray) -> str:
    """Encode a mask as SIIM-ACR does: column-major pixel order, pairs of (start offset from the end of the
    previous run, run length). An empty mask encodes as "-1"."""
    flat = np.asarray(mask, dtype=bool).T.ravel()
    if not flat.any():
        return "-1"
    padded = np.concatenate([[False], flat, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = changes[0::2], changes[1::2]
    parts: list[str] = []
    previous_end = 0
    for start, end in zip(starts, ends, strict=True):
        parts += [str(int(start - previous_end)), str(int(end - start))]
        previous_end = end
    return " ".join(parts)


def siim_rle_decode(rle: str, rows: int, cols: int) -> np.ndarray:
    """Decode one SIIM-ACR run-length string into a bool mask (rows, cols). "-1" decodes to an empty mask.

    Raises:
        ValueError: when the string is not pairs of integers or runs past the image.
    """
    text = rle.strip()
    flat = np.zeros(rows * cols, dtype=bool)
    if text == "-1" or not text:
        return flat.reshape(cols, rows).T
    try:
        numbers = [int(x) for x in text.split()]
    except ValueError as exc:
        raise ValueError(f"RLE {text[:40]!r} is not a list of integers") from exc
    if len(numbers) % 2:
        raise ValueError(f"RLE has an odd count of numbers ({len(numbers)}); expected start/length pairs")
    position = 0
    for start, length in zip(numbers[0::2], numbers[1::2], strict=True):
        position += start
        if position + length > flat.size:
            raise ValueError(f"RLE run {start} {length} goes past the {rows}x{cols} image")
        flat[position : position + length] = True
        position += length
    return flat.reshape(cols, rows).T


def write_siim_layout(
    out_dir: str | Path, n: int, seed: int = 0, size: int = 256, positive_fraction: float = 0.4
) -> Path:
    """Write the public SIIM-ACR Pneumothorax layout with synthetic images.

    Layout: dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm (8-bit MONOCHROME2
    CR, PA or AP) and train-rle.csv with columns "ImageId" and " EncodedPixels" (the leading space is in the
    original file): "-1" for a negative, one row per mask (column-major relative RLE) for a positive.

    Returns:
        The path of train-rle.csv.
    """
    out = Path(out_dir)
    images_dir = out / "dicom-images-train"
    images_dir.mkdir(parents=True, exist_ok=True)
    labels = _balanced_labels(n, positive_fraction, seed)
    rows_out: list[tuple[str, str]] = []
    for index in range(n):
        image_seed = seed * 1_000_003 + index + 500_000
        rng = np.random.default_rng(image_seed)
        drawn = synth_chest_radiograph(image_seed, bool(labels[index]), (size, size), rng=rng)
        ds = make_chest_radiograph_dataset(
            image_seed,
            bool(labels[index]),
            photometric="MONOCHROME2",
            sop_class="CR",
            view=str(rng.choice(["PA", "AP"])),
            window=None,
            bits_stored=8,
            image=drawn.image,
        )
        folder = images_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        rows_out.append((ds.SOPInstanceUID, siim_rle_encode(drawn.mask) if drawn.label else "-1"))
    rle_csv = out / "train-rle.csv"
    with rle_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageId", " EncodedPixels"])
        writer.writerows(rows_out)
    return rle_csv
