"""Labelled datasets for training and evaluation: a folder + labels.csv, or the SIIM-ACR pneumothorax layout."""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from triage.domain import SeriesInfo
from triage.errors import TriageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png",)
SIIM_RLE_NAMES = ("train-rle.csv", "stage_2_train.csv")
_TRUE = {"1", "true", "yes", "positive"}
_FALSE = {"0", "false", "no", "negative"}


class DatasetError(TriageError):
    """A labelled dataset cannot be used as given (missing file, bad label, empty or one-class set)."""


@dataclass(frozen=True)
class LabelledCase:
    """One labelled case: a single image file, or the files of a study folder.

    Attributes:
        case_id: the CSV's image entry (relative path) or the SIIM ImageId.
        path: the file or folder the entry names.
        label: 1 positive, 0 negative.
    """

    case_id: str
    path: Path
    label: int

    def files(self) -> tuple[str, ...]:
        """The files of the case: the file itself, or every file under the folder (sorted)."""
        if self.path.is_dir():
            return tuple(str(p) for p in sorted(self.path.rglob("*")) if p.is_file() and not p.name.startswith("."))
        return (str(self.path),)


def parse_label(value: str, where: str) -> int:
    """A 0/1 label from a CSV cell.

    Raises:
        DatasetError: for anything but 0/1 (or true/false, yes/no, positive/negative).
    """
    text = str(value).strip().lower()
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0
    try:
        number = float(text)
    except ValueError:
        number = None
    if number in (0.0, 1.0):
        return int(number)  # type: ignore[arg-type]
    raise DatasetError(f"{where}: label {value!r} is not 0 or 1")


def read_labels_csv(data_dir: str | Path, labels_csv: str | Path | None = None) -> list[LabelledCase]:
    """Read a CSV with columns `image` (a path relative to `data_dir`: a DICOM file, a PNG or a study folder)
    and `label` (0/1).

    Args:
        data_dir: the folder the image paths are relative to.
        labels_csv: the CSV (default: data_dir/labels.csv); a relative path is taken relative to the working
            directory first, then to `data_dir`.

    Raises:
        DatasetError: when the CSV is missing, lacks the columns, names a missing file or has a bad label.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"data folder {data_dir} does not exist")
    csv_path = Path(labels_csv) if labels_csv is not None else data_dir / "labels.csv"
    if not csv_path.is_file() and not csv_path.is_absolute() and (data_dir / csv_path).is_file():
        csv_path = data_dir / csv_path
    if not csv_path.is_file():
        raise DatasetError(f"labels file {csv_path} does not exist")
    cases: list[LabelledCase] = []
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if "image" not in columns or "label" not in columns:
            raise DatasetError(f"{csv_path.name}: columns are {columns}; expected 'image' and 'label'")
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): v for k, v in row.items() if k is not None}
            entry = (row.get("image") or "").strip()
            if not entry:
                raise DatasetError(f"{csv_path.name} line {line}: empty image path")
            path = data_dir / entry
            if not path.exists():
                raise DatasetError(f"{csv_path.name} line {line}: {entry!r} does not exist under {data_dir}")
            cases.append(LabelledCase(entry, path, parse_label(row.get("label", ""), f"{csv_path.name} line {line}")))
    if not cases:
        raise DatasetError(f"{csv_path.name} lists no images")
    return cases


def read_siim(siim_dir: str | Path) -> list[LabelledCase]:
    """Read the SIIM-ACR Pneumothorax layout: DICOM files named <SOPInstanceUID>.dcm anywhere under `siim_dir`
    and train-rle.csv (ImageId, EncodedPixels). A case is positive when any of its rows has a mask (not "-1").

    Images without a row are left out (as in the challenge's unlabelled test images) and counted in the log.

    Raises:
        DatasetError: when there is no RLE CSV, it lacks the columns, or no listed image is found.
    """
    root = Path(siim_dir)
    csv_path = next((root / n for n in SIIM_RLE_NAMES if (root / n).is_file()), None)
    if csv_path is None:
        raise DatasetError(f"{root}: no {' or '.join(SIIM_RLE_NAMES)} found; is this the SIIM-ACR layout?")
    labels: dict[str, int] = {}
    with csv_path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        if "ImageId" not in header or "EncodedPixels" not in header:
            raise DatasetError(f"{csv_path.name}: header {header}; expected ImageId and EncodedPixels")
        id_col, rle_col = header.index("ImageId"), header.index("EncodedPixels")
        for row in reader:
            if not row:
                continue
            image_id, rle = row[id_col].strip(), row[rle_col].strip()
            positive = int(rle not in ("-1", ""))
            labels[image_id] = max(labels.get(image_id, 0), positive)
    files = {p.stem: p for p in root.rglob("*.dcm")}
    cases = [LabelledCase(image_id, files[image_id], label) for image_id, label in labels.items() if image_id in files]
    missing = len(labels) - len(cases)
    if missing:
        log.warning("SIIM layout: %d listed image(s) have no DICOM file under %s", missing, root)
    unlabelled = len(set(files) - set(labels))
    if unlabelled:
        log.info("SIIM layout: %d DICOM file(s) have no row in %s and are left out", unlabelled, csv_path.name)
    if not cases:
        raise DatasetError(f"{root}: none of the {len(labels)} images in {csv_path.name} was found as <ImageId>.dcm")
    return cases


def stratified_split(
    cases: Sequence[LabelledCase], val_fraction: float, seed: int
) -> tuple[list[LabelledCase], list[LabelledCase]]:
    """Split into (train, validation) keeping the positive fraction in both.

    Raises:
        DatasetError: when the fraction is outside (0, 1) or a class has fewer than two cases.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction={val_fraction} must be within (0, 1)")
    labels = np.array([c.label for c in cases])
    counts = {int(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True), strict=True)}
    if len(counts) < 2 or min(counts.values()) < 2:
        raise DatasetError(f"need at least two cases of each label to split; have {counts}")
    rng = np.random.default_rng(seed)
    train: list[LabelledCase] = []
    val: list[LabelledCase] = []
    for label in sorted(counts):
        members = [c for c in cases if c.label == label]
        order = rng.permutation(len(members))
        n_val = min(max(1, round(len(members) * val_fraction)), len(members) - 1)
        val += [members[i] for i in order[:n_val]]
        train += [members[i] for i in order[n_val:]]
    return train, val


def prepare_cases(
    cases: Sequence[LabelledCase], prepare: Callable[[Sequence[str]], Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Run the service's preprocessing on every case.

    Args:
        cases: labelled cases.
        prepare: files -> a prepared record with an `image` (1, H, W) array (the pipeline's `prepare_files`).

    Returns:
        (images (N, 1, H, W) float32, labels (N,) float32).

    Raises:
        DatasetError: naming the case whose image cannot be read.
    """
    images: list[np.ndarray] = []
    for case in cases:
        try:
            images.append(prepare(case.files()).image)
        except TriageError as exc:
            raise DatasetError(f"case {case.case_id!r}: {exc}") from exc
    return np.stack(images).astype(np.float32), np.array([c.label for c in cases], dtype=np.float32)


def series_in_folder(folder: str | Path) -> list[SeriesInfo]:
    """Group the DICOM files under a folder by Series Instance UID (headers only), in Instance Number order.

    Files that are not DICOM are skipped. PNG files form one pseudo-series each (modality "OT").
    """
    import pydicom

    groups: dict[str, list[tuple[int, str]]] = defaultdict(list)
    first: dict[str, Any] = {}
    series: list[SeriesInfo] = []
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            series.append(SeriesInfo(path.stem, "OT", "", 1, (str(path),), {"format": "png"}))
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # not DICOM: a README, a CSV, ...
            continue
        uid = str(ds.get("SeriesInstanceUID", path.parent))
        groups[uid].append((int(ds.get("InstanceNumber", 0) or 0), str(path)))
        first.setdefault(uid, ds)
    for uid, members in groups.items():
        ds = first[uid]
        files = tuple(p for _, p in sorted(members))
        attributes = {
            k: str(ds.get(k, "")) for k in ("BodyPartExamined", "ViewPosition", "SeriesDescription", "StudyInstanceUID")
        }
        series.append(
            SeriesInfo(uid, str(ds.get("Modality", "")), str(ds.get("SOPClassUID", "")), len(files), files, attributes)
        )
    return series
