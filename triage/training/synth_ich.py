"""Copy a head CT with a synthetic hyperdense (haemorrhage-like) region inserted, to check the ICH pipeline."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from triage.errors import InvalidStudyError

log = logging.getLogger(__name__)

BONE_HU = 300.0
PARENCHYMA_HU = (20.0, 45.0)


@dataclass(frozen=True)
class InsertedBleed:
    """What was inserted: centre (LPS mm), volume of the blob in mL, and the slices it touches (sorted order)."""

    out_dir: Path
    centre_lps: tuple[float, float, float]
    volume_ml: float
    radius_mm: float
    slices: list[int]
    sop_instance_uids: list[str]
    study_uid: str
    series_uid: str


def _load(datasets_or_dir: Path | str | Sequence[Dataset]) -> list[Dataset]:
    datasets: list[Dataset] = []
    if isinstance(datasets_or_dir, (str, Path)):
        for path in sorted(p for p in Path(datasets_or_dir).iterdir() if p.is_file()):
            try:
                datasets.append(pydicom.dcmread(path))
            except InvalidDicomError:
                continue  # README, LICENSE and other non-DICOM files beside the slices
    else:
        datasets = [ds.copy() for ds in datasets_or_dir]
    datasets = [ds for ds in datasets if "PixelData" in ds and "ImagePositionPatient" in ds]
    if len(datasets) < 2:
        raise InvalidStudyError(f"need at least 2 CT slices with pixels and geometry, got {len(datasets)}")
    return datasets


def _geometry(ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    row_cos, col_cos = orientation[:3], orientation[3:]
    position = np.asarray([float(v) for v in ds.ImagePositionPatient])
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
    return position, row_cos, col_cos, row_mm, col_mm


def _hu(ds: Dataset) -> np.ndarray:
    slope = float(getattr(ds, "RescaleSlope", 1.0))
    intercept = float(getattr(ds, "RescaleIntercept", 0.0))
    return ds.pixel_array.astype(np.float32) * slope + intercept


def _blob_radius(directions: np.ndarray, coeffs: np.ndarray, radius_mm: float) -> np.ndarray:
    """Irregular radius r(direction): a sphere modulated by a few random low-order harmonics (unit vectors in)."""
    x, y, z = directions[..., 0], directions[..., 1], directions[..., 2]
    basis = np.stack([x, y, z, x * y, y * z, x * z, x * x - y * y, 3 * z * z - 1], axis=-1)
    return radius_mm * (1.0 + basis @ coeffs)


def _blob_volume_ml(coeffs: np.ndarray, radius_mm: float, step_mm: float = 0.5) -> float:
    extent = radius_mm * (1.0 + np.abs(coeffs).sum()) + step_mm
    axis = np.arange(-extent, extent + step_mm, step_mm)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)
    dist = np.linalg.norm(grid, axis=-1)
    directions = grid / np.maximum(dist, 1e-9)[..., None]
    inside = dist <= _blob_radius(directions, coeffs, radius_mm)
    return float(inside.sum()) * step_mm**3 / 1000.0


def insert_haemorrhage(
    datasets_or_dir: Path | str | Sequence[Dataset],
    out_dir: Path,
    volume_ml: float = 5.0,
    hu: tuple[float, float] = (55.0, 75.0),
    seed: int = 0,
    bone_clearance_mm: float = 10.0,
) -> InsertedBleed:
    """Copy a head CT series into `out_dir` with an irregular hyperdense region inside the brain parenchyma.

    The region is a sphere of about `volume_ml` whose radius is modulated by random low-order harmonics; its
    centre is drawn (by `seed`) among parenchyma pixels (20-45 HU locally) at least radius + `bone_clearance_mm`
    from bone (> 300 HU) in the centre slice and in every slice the region touches, so it never touches the skull.
    Voxels inside get HU drawn uniformly in `hu` with smooth texture; stored values respect slope/intercept and the
    stored dtype. New Study, Series and SOP Instance UIDs are written; the patient name says SYNTHETIC.
    This exercises the pipeline; it says nothing about clinical accuracy.

    Args:
        datasets_or_dir: a folder of the series' DICOM files or the datasets themselves (not modified).
        out_dir: where the altered copy is written, one file per slice.
        volume_ml: target volume of the blob (mL); the exact analytic volume is returned.
        hu: (low, high) HU of the inserted blood.
        seed: random seed for position, shape and texture.
        bone_clearance_mm: minimum distance between the blob surface and bone.

    Returns:
        An InsertedBleed describing the insert.

    Raises:
        InvalidStudyError: when the series has fewer than 2 usable slices or no parenchyma far enough from bone.
    """
    rng = np.random.default_rng(seed)
    datasets = _load(datasets_or_dir)
    geo = [_geometry(ds) for ds in datasets]
    normal = np.cross(geo[0][1], geo[0][2])
    order = np.argsort([g[0] @ normal for g in geo])
    datasets = [datasets[i] for i in order]
    geo = [geo[i] for i in order]
    hus = [_hu(ds) for ds in datasets]

    coeffs = rng.uniform(-0.18, 0.18, size=8)
    radius = (3.0 * volume_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
    radius *= (volume_ml / _blob_volume_ml(coeffs, radius)) ** (1.0 / 3.0)
    reach = radius * (1.0 + np.abs(coeffs).sum())

    centre = _choose_centre(hus, geo, reach + bone_clearance_mm, rng)
    texture_lo, texture_hi = hu
    base = rng.uniform(texture_lo + 5.0, texture_hi - 5.0)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    touched: list[int] = []
    new_uids: list[str] = []
    for index, (ds, (position, row_cos, col_cos, row_mm, col_mm), slice_hu) in enumerate(
        zip(datasets, geo, hus, strict=True)
    ):
        ds = ds.copy()
        if abs(float((centre - position) @ normal)) <= reach:
            rr, cc = np.meshgrid(np.arange(slice_hu.shape[0]), np.arange(slice_hu.shape[1]), indexing="ij")
            points = position + row_cos * (cc[..., None] * col_mm) + col_cos * (rr[..., None] * row_mm)
            offset = points - centre
            dist = np.linalg.norm(offset, axis=-1)
            directions = offset / np.maximum(dist, 1e-9)[..., None]
            inside = dist <= _blob_radius(directions, coeffs, radius)
            if inside.any():
                noise = ndimage.gaussian_filter(rng.normal(0.0, 1.0, slice_hu.shape), 3.0)
                noise *= 4.0 / max(float(noise.std()), 1e-6)
                values = np.clip(base + noise, texture_lo, texture_hi)
                slice_hu = np.where(inside, values, slice_hu).astype(np.float32)
                _write_pixels(ds, slice_hu)
                touched.append(index)
        sop_uid = generate_uid()
        _relabel(ds, study_uid, series_uid, frame_uid, sop_uid, seed)
        new_uids.append(sop_uid)
        ds.save_as(out_dir / f"{index + 1:03d}.dcm", enforce_file_format=True)
    if not touched:
        raise InvalidStudyError("the synthetic region fell between slices; try another seed or a larger volume")
    volume = _blob_volume_ml(coeffs, radius)
    log.info("inserted %.2f mL at %s over %d slices", volume, np.round(centre, 1).tolist(), len(touched))
    return InsertedBleed(
        out_dir=out_dir,
        centre_lps=tuple(float(v) for v in centre),  # type: ignore[arg-type]
        volume_ml=volume,
        radius_mm=float(radius),
        slices=touched,
        sop_instance_uids=new_uids,
        study_uid=study_uid,
        series_uid=series_uid,
    )


def _choose_centre(
    hus: list[np.ndarray],
    geo: list[tuple[np.ndarray, np.ndarray, np.ndarray, float, float]],
    clearance_mm: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """A random parenchyma point whose distance to bone is at least `clearance_mm` on every nearby slice."""
    normal = np.cross(geo[0][1], geo[0][2])
    heights = np.array([g[0] @ normal for g in geo])
    distances = [_bone_distance_mm(h, g[3], g[4]) for h, g in zip(hus, geo, strict=True)]
    candidates: list[np.ndarray] = []
    for index, (slice_hu, (position, row_cos, col_cos, row_mm, col_mm)) in enumerate(zip(hus, geo, strict=True)):
        if index < 1 or index > len(hus) - 2:
            continue
        clear = distances[index] >= clearance_mm
        local = ndimage.uniform_filter(slice_hu, size=int(round(6.0 / row_mm)))
        parenchyma = (local >= PARENCHYMA_HU[0]) & (local <= PARENCHYMA_HU[1])
        rr, cc = np.nonzero(clear & parenchyma)
        if rr.size == 0:
            continue
        pick = rng.choice(rr.size, size=min(rr.size, 20), replace=False)
        for r, c in zip(rr[pick], cc[pick], strict=True):
            candidates.append(position + row_cos * (c * col_mm) + col_cos * (r * row_mm))
    rng.shuffle(candidates)
    for point in candidates:
        near = np.flatnonzero(np.abs(heights - point @ normal) <= clearance_mm)
        if all(_clear_on_slice(point, hus[i], distances[i], geo[i], clearance_mm) for i in near):
            return point
    raise InvalidStudyError(f"no parenchyma point lies {clearance_mm:.0f} mm from bone on every nearby slice")


def _bone_distance_mm(slice_hu: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    bone = slice_hu > BONE_HU
    if not bone.any():
        return np.zeros(slice_hu.shape)  # no skull in this slice: nowhere is safely inside it
    return ndimage.distance_transform_edt(~bone, sampling=(row_mm, col_mm))


def _clear_on_slice(
    point: np.ndarray,
    slice_hu: np.ndarray,
    bone_distance_mm: np.ndarray,
    geometry: tuple[np.ndarray, np.ndarray, np.ndarray, float, float],
    clearance_mm: float,
) -> bool:
    position, row_cos, col_cos, row_mm, col_mm = geometry
    col = int(round(float((point - position) @ row_cos) / col_mm))
    row = int(round(float((point - position) @ col_cos) / row_mm))
    if not (0 <= row < slice_hu.shape[0] and 0 <= col < slice_hu.shape[1]):
        return False
    # The in-plane clearance needed shrinks with the distance to the plane (a sphere's cross-section).
    height = abs(float((point - position) @ np.cross(row_cos, col_cos)))
    needed = float(np.sqrt(max(clearance_mm**2 - height**2, 0.0)))
    head = slice_hu[max(0, row - 1) : row + 2, max(0, col - 1) : col + 2]
    return bool(np.all(head > -100.0)) and bone_distance_mm[row, col] >= needed


def _write_pixels(ds: Dataset, slice_hu: np.ndarray) -> None:
    """Store HU back as stored values (inverse slope/intercept), in the dataset's stored dtype, uncompressed."""
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    slope = float(getattr(ds, "RescaleSlope", 1.0))
    intercept = float(getattr(ds, "RescaleIntercept", 0.0))
    dtype = ds.pixel_array.dtype
    info = np.iinfo(dtype)
    bits = int(getattr(ds, "BitsStored", info.bits))
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if info.min < 0 else (0, (1 << bits) - 1)
    stored = np.clip(np.rint((slice_hu - intercept) / slope), lo, hi).astype(dtype)
    ds.PixelData = stored.tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def _relabel(ds: Dataset, study_uid: str, series_uid: str, frame_uid: str, sop_uid: str, seed: int) -> None:
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.PatientName = "SYNTHETIC^ICH"
    ds.PatientID = f"SYNTH-ICH-{seed}"
    ds.SeriesDescription = f"{getattr(ds, 'SeriesDescription', '')} + synthetic hyperdense insert".strip()
    # The worklist shows the study description: a synthetic study must say so wherever it appears.
    ds.StudyDescription = f"{getattr(ds, 'StudyDescription', '')} (SYNTHETIC INSERT)".strip()
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.DerivationDescription = "synthetic hyperdense region inserted by triage.training.synth_ich (not a real bleed)"
    ds.AccessionNumber = ""


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m triage.training.synth_ich SRC OUT [--volume-ml 5] [--seed 0]`."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--volume-ml", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = insert_haemorrhage(args.source, args.out, volume_ml=args.volume_ml, seed=args.seed)
    print(f"{result.volume_ml:.2f} mL at LPS {np.round(result.centre_lps, 1).tolist()} on slices {result.slices}")


if __name__ == "__main__":
    main()
