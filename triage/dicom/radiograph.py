"""Read one projection radiograph (CR, DX, secondary capture, or a PNG) into presentation values in [0, 1]."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from triage.dicom.store import check_decode_limits
from triage.errors import InvalidStudyError, NotFoundError, UnsupportedInputError
from triage.storage import InstanceSource, PathSource, key_name

log = logging.getLogger(__name__)

PNG_SUFFIXES = (".png",)
# Views a frontal chest model can read (DICOM (0018,5101) View Position).
FRONTAL_VIEWS = ("PA", "AP")


@dataclass(frozen=True)
class Radiograph:
    """One radiograph as a viewer would present it.

    Attributes:
        pixels: float32 array (rows, cols) in [0, 1]; higher is brighter (bone bright, air dark), i.e. after the
            Modality LUT, the VOI LUT and, for MONOCHROME1, inversion.
        sop_instance_uid: the instance's SOP Instance UID (for a PNG: the file name without suffix).
        rows: number of rows.
        cols: number of columns.
        pixel_spacing_mm: (row spacing, column spacing) in mm from Pixel Spacing or Imager Pixel Spacing; None if
            the file has neither.
        view_position: (0018,5101) View Position, e.g. "PA", "AP", "LL"; "" when absent.
        photometric: the stored Photometric Interpretation ("MONOCHROME1" or "MONOCHROME2").
        voi: which VOI transformation was applied: "lut", "window", or "minmax" (no VOI in the file).
    """

    pixels: np.ndarray
    sop_instance_uid: str
    rows: int
    cols: int
    pixel_spacing_mm: tuple[float, float] | None
    view_position: str
    photometric: str
    voi: str = "minmax"


def read_radiograph(path: str | Path, source: InstanceSource | None = None) -> Radiograph:
    """Read a single-frame greyscale radiograph from a DICOM instance (any transfer syntax pydicom can decode).

    Args:
        path: the instance's key in `source` (a file path when `source` is None).
        source: where instances are read from (the store, or bytes fetched from it).

    Raises:
        InvalidStudyError: when the file is not DICOM, has no pixel data, or its pixel data cannot be decoded.
        UnsupportedInputError: for multi-frame or colour images.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    name = key_name(str(path))
    reader = source if source is not None else PathSource()
    try:
        with reader.open(str(path)) as handle:
            ds = pydicom.dcmread(handle)
    except NotFoundError as exc:
        raise InvalidStudyError(f"{name}: {exc}") from exc
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise InvalidStudyError(f"{name}: not a readable DICOM file ({exc})") from exc
    return radiograph_from_dataset(ds, source=name)


def read_image_file(path: str | Path, source: InstanceSource | None = None) -> Radiograph:
    """Read a radiograph from a DICOM file or, for offline datasets, an 8- or 16-bit greyscale PNG.

    A PNG is taken as already presentation-ready (higher = brighter) and scaled by its bit depth.

    Raises:
        InvalidStudyError: when the file cannot be read.
        UnsupportedInputError: for colour, multi-frame or palette images.
    """
    if source is None and Path(path).suffix.lower() in PNG_SUFFIXES:
        return _read_png(Path(path))
    return read_radiograph(path, source)


def select_radiograph(files: Sequence[str | Path], source: InstanceSource | None = None) -> tuple[str | Path, str]:
    """Pick the image a frontal chest model reads from a series' files, and say why.

    The first file (in the given order) whose View Position is PA or AP wins; when no file states a frontal view,
    the first readable file is used. PNG files have no view and the first one is used.

    Args:
        files: the series' instance keys in `source` (file paths when `source` is None).
        source: where instances are read from.

    Returns:
        (key, reason): the chosen entry of `files` as given, and a short sentence recorded with the finding.

    Raises:
        InvalidStudyError: when the series has no files.
    """
    if not files:
        raise InvalidStudyError("the series has no files to read a radiograph from")
    paths = list(files)
    if len(paths) == 1:
        return paths[0], "single image in the series"
    import pydicom

    reader = source if source is not None else PathSource()
    for path in paths:
        if source is None and Path(path).suffix.lower() in PNG_SUFFIXES:
            continue
        try:
            with reader.open(str(path)) as handle:
                header = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=["ViewPosition"])
        except Exception:  # an unreadable file is reported when it is actually read
            continue
        view = str(header.get("ViewPosition", "")).strip().upper()
        if view in FRONTAL_VIEWS:
            return path, f"first {view} image of {len(paths)} in the series"
    return paths[0], f"no PA/AP view stated; first of {len(paths)} images in the series"


def radiograph_from_dataset(ds: Any, source: str = "dataset") -> Radiograph:
    """Turn a decoded pydicom Dataset into presentation values.

    Order (PS3.4 N.2, greyscale pipeline): Modality LUT (Modality LUT Sequence or Rescale Slope/Intercept), then
    VOI LUT (VOI LUT Sequence or Window Center/Width; the first of several; VOI LUT Function LINEAR, LINEAR_EXACT or
    SIGMOID), then MONOCHROME1 is inverted so that higher values are brighter, then scaled to [0, 1] by the range
    the VOI transformation can output. Without any VOI, the image's own min/max are used.

    Raises:
        InvalidStudyError: when there is no pixel data or it cannot be decoded.
        UnsupportedInputError: for multi-frame or colour images.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:  # type: ignore[operator]
        raise InvalidStudyError(f"{source}: the instance has no pixel data (not an image)")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UnsupportedInputError(
            f"{source}: multi-frame image with NumberOfFrames={frames}; a radiograph model reads single-frame images"
        )
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).strip().upper()
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedInputError(
            f"{source}: PhotometricInterpretation={photometric!r} with SamplesPerPixel={samples}; "
            "only greyscale MONOCHROME1/MONOCHROME2 radiographs are supported"
        )
    check_decode_limits(ds)  # a declared 65535 x 65535 image is refused here, before anything is allocated
    try:
        stored = ds.pixel_array  # type: ignore[attr-defined]
    except Exception as exc:  # decoders raise a variety of errors on corrupt or truncated data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise InvalidStudyError(f"{source}: pixel data cannot be decoded (transfer syntax {ts}): {exc}") from exc
    if stored.ndim != 2:
        raise UnsupportedInputError(f"{source}: pixel array has shape {stored.shape}; expected (rows, cols)")

    try:
        # Kept in its own dtype: a VOI LUT indexes with integers (pydicom warns on float input).
        modality = np.asarray(apply_modality_lut(stored, ds))
        voi_lut_items = ds.get("VOILUTSequence")  # type: ignore[attr-defined]
        if voi_lut_items:
            presented = np.asarray(apply_voi(modality, ds, 0), dtype=np.float64)
            lo, hi = _lut_output_range(ds, voi_lut_items[0])
            voi = "lut"
        elif "WindowCenter" in ds and "WindowWidth" in ds:  # type: ignore[operator]
            from pydicom.pixels import apply_windowing

            presented = np.asarray(apply_windowing(modality, ds, 0), dtype=np.float64)
            lo, hi = _window_output_range(ds)
            voi = "window"
        else:
            presented = modality.astype(np.float64)
            lo, hi = float(presented.min()), float(presented.max())
            voi = "minmax"
    except ValueError as exc:  # pydicom's message names the bad attribute (e.g. Window Width < 1)
        raise InvalidStudyError(f"{source}: cannot apply the LUTs: {exc}") from exc

    span = hi - lo
    pixels = np.zeros_like(presented) if span <= 0 else (presented - lo) / span
    pixels = np.clip(pixels, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        # MONOCHROME1: the minimum value is displayed white (PS3.3 C.7.6.3.1.2); invert so bone is bright.
        pixels = 1.0 - pixels
    return Radiograph(
        pixels=pixels.astype(np.float32),
        sop_instance_uid=str(getattr(ds, "SOPInstanceUID", source)),
        rows=int(stored.shape[0]),
        cols=int(stored.shape[1]),
        pixel_spacing_mm=_pixel_spacing(ds),
        view_position=str(getattr(ds, "ViewPosition", "") or "").strip().upper(),
        photometric=photometric,
        voi=voi,
    )


def _pixel_spacing(ds: Any) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = getattr(ds, keyword, None)
        if value is not None and len(value) == 2:
            try:
                spacing = float(value[0]), float(value[1])
            except (TypeError, ValueError):
                log.warning("ignoring malformed %s %r", keyword, value)
                continue
            # Some CR writers put zeros in Pixel Spacing; Imager Pixel Spacing may still be right.
            if spacing[0] > 0 and spacing[1] > 0:
                return spacing
    return None


def _lut_output_range(ds: Any, item: Any) -> tuple[float, float]:
    """The output range of the first VOI LUT: the smallest and largest of its entries (PS3.3 C.11.2.1.1).

    The LUT Descriptor's bit depth is not trusted on its own: writers declare 16 bits for 8-bit data.
    """
    from pydicom.pixels import apply_voi

    descriptor = [int(v) for v in getattr(item, "LUTDescriptor", [0, 0, 16])]
    entries = descriptor[0] or 65536  # 0 means 2**16 entries
    first_mapped = descriptor[1]
    ramp = np.arange(first_mapped, first_mapped + entries, dtype=np.int64)
    outputs = np.asarray(apply_voi(ramp, ds, 0), dtype=np.float64)
    return float(outputs.min()), float(outputs.max())


def _window_output_range(ds: Any) -> tuple[float, float]:
    """The range pydicom's windowing maps into: the modality LUT's output range (PS3.3 C.11.2.1.2)."""
    bits_stored = int(getattr(ds, "BitsStored", 16))
    modality_luts = getattr(ds, "ModalityLUTSequence", None)
    if modality_luts:
        y_min, y_max = 0.0, float(2 ** int(modality_luts[0].LUTDescriptor[2]) - 1)
    elif int(getattr(ds, "PixelRepresentation", 0)) == 0:
        y_min, y_max = 0.0, float(2**bits_stored - 1)
    else:
        y_min, y_max = float(-(2 ** (bits_stored - 1))), float(2 ** (bits_stored - 1) - 1)
    slope = getattr(ds, "RescaleSlope", None)
    intercept = getattr(ds, "RescaleIntercept", None)
    if slope is not None and intercept is not None:
        y_min = y_min * float(slope) + float(intercept)
        y_max = y_max * float(slope) + float(intercept)
    return min(y_min, y_max), max(y_min, y_max)


def _read_png(path: Path) -> Radiograph:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode in ("RGB", "RGBA", "P", "CMYK", "LA", "YCbCr"):
                raise UnsupportedInputError(f"{path.name}: colour PNG (mode {mode!r}); expected greyscale L or I;16")
            frames = int(getattr(image, "n_frames", 1))
            if frames > 1:
                raise UnsupportedInputError(f"{path.name}: animated PNG with {frames} frames")
            array = np.asarray(image)
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidStudyError(f"{path.name}: not a readable PNG ({exc})") from exc
    if array.ndim != 2:
        raise UnsupportedInputError(f"{path.name}: image has shape {array.shape}; expected (rows, cols)")
    if array.dtype == np.uint8:
        scale = 255.0
    elif array.dtype in (np.uint16, np.int32, np.int16):
        scale = 255.0 if array.max() <= 255 and mode == "L" else 65535.0
    elif array.dtype == np.bool_:
        scale = 1.0
    else:
        raise UnsupportedInputError(f"{path.name}: PNG pixel type {array.dtype} (mode {mode!r}) is not supported")
    pixels = np.clip(array.astype(np.float32) / scale, 0.0, 1.0)
    return Radiograph(
        pixels=pixels,
        sop_instance_uid=path.stem,
        rows=int(array.shape[0]),
        cols=int(array.shape[1]),
        pixel_spacing_mm=None,
        view_position="",
        photometric="MONOCHROME2",
        voi="png",
    )
