"""Preview PNGs for the study page: the key CT slice (brain window) or the radiograph, with the AI's region in red.

A preview is a triage aid rendered from the stored DICOM, never a diagnostic image: every PNG carries the caption
"NOT FOR DIAGNOSTIC USE" burnt into the pixels, and no patient identifiers.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from triage.dicom.radiograph import radiograph_from_dataset
from triage.dicom.store import check_decode_limits
from triage.domain import Overlay
from triage.errors import InvalidStudyError, NotFoundError
from triage.storage import InstanceSource, PathSource, Store, key_name, overlay_from_bytes
from triage.worklist.tables import Instance

log = logging.getLogger(__name__)

# Brain window (PS3.3 C.11.2.1.2: a window of 80 HU centred on 40 HU): 0 HU black, 80 HU white.
BRAIN_WINDOW_HU = (0.0, 80.0)
CT_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1")
CAPTION = "NOT FOR DIAGNOSTIC USE"
# The preview's longer side: large radiographs are shrunk, small CT slices enlarged so the caption fits.
MAX_SIDE_PX = 768
MIN_SIDE_PX = 512
OVERLAY_RGB = (255, 40, 40)
OVERLAY_ALPHA = 0.45


@dataclass(frozen=True)
class PreviewImage:
    """A greyscale image ready to draw on: uint8 (rows, cols), 0 black, 255 white."""

    grey: np.ndarray
    sop_instance_uid: str
    kind: str  # "ct" or "radiograph"


def instance_key_of(engine: Engine, study_uid: str, sop_instance_uid: str) -> str:
    """The store key of one instance of the study (from the instances table).

    Raises:
        NotFoundError: when the study has no such instance.
    """
    with Session(engine) as session:
        key = session.scalar(
            select(Instance.store_key).where(
                Instance.sop_instance_uid == sop_instance_uid, Instance.study_uid == study_uid
            )
        )
    if key is None:
        raise NotFoundError(f"study {study_uid!r} has no instance {sop_instance_uid!r}")
    return str(key)


def series_files(engine: Engine, study_uid: str, series_uid: str) -> list[tuple[str, str]]:
    """(SOP Instance UID, store key) of every stored instance of one series, in arrival order."""
    with Session(engine) as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.store_key)
            .where(Instance.study_uid == study_uid, Instance.series_uid == series_uid)
            .order_by(Instance.id)
        ).all()
    return [(uid, str(key)) for uid, key in rows]


def middle_instance(files: list[tuple[str, str]], source: InstanceSource | None = None) -> tuple[str, str]:
    """The middle slice of a series along its slice normal (by ImagePositionPatient), else the middle file.

    Only used to choose a preview when no finding names a key slice; analysis never relies on this order.

    Args:
        files: (SOP Instance UID, key) pairs, as `series_files` gives them.
        source: where the instances are read from (None: the keys are file paths).

    Raises:
        NotFoundError: when the series has no stored instances.
    """
    if not files:
        raise NotFoundError("the series has no stored instances to preview")
    import pydicom

    reader = source if source is not None else PathSource()
    placed = []
    for uid, key in files:
        try:
            with reader.open(key) as handle:
                ds = pydicom.dcmread(
                    handle, stop_before_pixels=True, specific_tags=["ImagePositionPatient", "ImageOrientationPatient"]
                )
            ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
            iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
            normal = np.cross(iop[:3], iop[3:])
            placed.append((float(ipp @ normal), uid, key))
        except Exception:  # noqa: BLE001 - a radiograph or a header without geometry: arrival order then
            placed = []
            break
    if placed:
        placed.sort(key=lambda t: t[0])
        _, uid, key = placed[len(placed) // 2]
        return uid, key
    return files[len(files) // 2]


def load_overlay(store: Store, study_uid: str, overlay_file: str) -> Overlay:
    """Read a finding's overlay (mask, stride, sop_instance_uid, kind) from the study's overlays in the store.

    Raises:
        NotFoundError: when it is not stored or the name is not an overlay name (it cannot point elsewhere).
    """
    return overlay_from_bytes(store.get_overlay(study_uid, overlay_file), overlay_file)


def read_preview_image(
    path: str | Path, frame: int | None = None, source: InstanceSource | None = None
) -> PreviewImage:
    """Read a stored instance (by key from `source`; a file path when None) as a display image: CT in the brain
    window, a radiograph as presented.

    Raises:
        InvalidStudyError: when the file cannot be read or decoded.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut

    name = key_name(str(path))
    reader = source if source is not None else PathSource()
    try:
        with reader.open(str(path)) as handle:
            ds = pydicom.dcmread(handle)
    except Exception as exc:  # noqa: BLE001 - any read failure is the same to the viewer
        raise InvalidStudyError(f"{name}: not a readable DICOM file ({exc})") from exc
    uid = str(ds.get("SOPInstanceUID", ""))
    is_ct = str(ds.get("Modality", "")).upper() == "CT" or str(ds.get("SOPClassUID", "")) in CT_SOP_CLASSES
    if not is_ct:
        return PreviewImage(_to_uint8(radiograph_from_dataset(ds, source=name).pixels, 0.0, 1.0), uid, "radiograph")
    check_decode_limits(ds)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        raise InvalidStudyError(f"{name}: pixel data cannot be decoded ({exc})") from exc
    if pixels.ndim == 3:  # Enhanced CT: one frame; the middle one unless the overlay says which
        index = frame if frame is not None and 0 <= frame < pixels.shape[0] else pixels.shape[0] // 2
        hu = _enhanced_frame_hu(ds, pixels, index)
    else:
        hu = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    return PreviewImage(_to_uint8(hu, *BRAIN_WINDOW_HU), uid, "ct")


def _enhanced_frame_hu(ds: Any, pixels: np.ndarray, index: int) -> np.ndarray:
    slope, intercept = 1.0, 0.0
    for seq_name in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        groups = ds.get(seq_name)
        if not groups:
            continue
        item = groups[index] if seq_name.startswith("PerFrame") and len(groups) > index else groups[0]
        transform = item.get("PixelValueTransformationSequence")
        if transform:
            slope = float(transform[0].get("RescaleSlope", 1.0))
            intercept = float(transform[0].get("RescaleIntercept", 0.0))
            break
    return pixels[index].astype(np.float32) * slope + intercept


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (np.asarray(values, dtype=np.float32) - low) / (high - low)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def mask_on_image(overlay: Overlay, shape: tuple[int, int]) -> np.ndarray:
    """The overlay mask on the image's pixel grid: float32 (rows, cols) in [0, 1].

    The stored mask is the image downsampled by `stride`; it is upsampled by the stride (bilinear) and cropped or
    zero-padded to the image size.
    """
    mask = np.clip(np.nan_to_num(np.asarray(overlay.mask, dtype=np.float32)), 0.0, 1.0)
    if mask.ndim != 2:
        raise InvalidStudyError(f"overlay mask must be 2-D, got shape {mask.shape}")
    stride = max(1, int(overlay.stride))
    target = (mask.shape[0] * stride, mask.shape[1] * stride)
    if stride > 1:
        mask = np.asarray(
            Image.fromarray(mask, mode="F").resize((target[1], target[0]), Image.Resampling.BILINEAR), dtype=np.float32
        )
    out = np.zeros(shape, dtype=np.float32)
    rows, cols = min(shape[0], mask.shape[0]), min(shape[1], mask.shape[1])
    out[:rows, :cols] = mask[:rows, :cols]
    return out


def compose(grey: np.ndarray, mask: np.ndarray | None, kind: str = "mask", max_side: int = MAX_SIDE_PX) -> Image.Image:
    """Draw the mask over the greyscale image: red translucent fill plus a solid contour.

    The image is scaled so its longer side lies between MIN_SIDE_PX and `max_side`.

    Args:
        grey: uint8 (rows, cols).
        mask: float32 (rows, cols) in [0, 1] on the same grid, or None.
        kind: "mask" (filled where >= 0.5) or "heatmap" (opacity follows the value).
    """
    image = Image.fromarray(grey, mode="L")
    longest = max(grey.shape)
    scale = max_side / longest if longest > max_side else max(1.0, MIN_SIDE_PX / longest)
    size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
    if scale != 1.0:
        image = image.resize(size, Image.Resampling.LANCZOS if scale < 1.0 else Image.Resampling.BILINEAR)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    if mask is not None and mask.any():
        small = np.asarray(Image.fromarray(mask, mode="F").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
        inside = small >= 0.5
        alpha = np.clip(small, 0.0, 1.0) * OVERLAY_ALPHA if kind == "heatmap" else inside * OVERLAY_ALPHA
        colour = np.asarray(OVERLAY_RGB, dtype=np.float32)
        rgb = rgb * (1.0 - alpha[..., None]) + colour * alpha[..., None]
        edge = inside & ~ndimage.binary_erosion(inside, iterations=1)
        thickness = round(max(size) / 400)
        if thickness > 0:  # iterations=0 would mean "dilate until nothing changes" in scipy
            edge = ndimage.binary_dilation(edge, iterations=thickness)
        rgb[edge] = colour
    return Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def add_caption(image: Image.Image, lines: list[str]) -> Image.Image:
    """A black band under the image with the caption in white (first line) and details in grey."""
    size = max(12, image.width // 40)
    small_size = max(10, size * 3 // 4)
    font, small = _font(size), _font(small_size)
    band = size + 12 + (len(lines) - 1) * small_size + 8 * len(lines)
    out = Image.new("RGB", (image.width, image.height + band), (0, 0, 0))
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    y = image.height + 6
    for i, line in enumerate(lines):
        draw.text((8, y), line, fill=(255, 255, 255) if i == 0 else (190, 190, 190), font=font if i == 0 else small)
        y += (size if i == 0 else small_size) + 8
    return out


def render_png(image: PreviewImage, overlay: Overlay | None, details: str = "") -> bytes:
    """The preview as PNG bytes, captioned "NOT FOR DIAGNOSTIC USE" (and `details` on a second line)."""
    mask = mask_on_image(overlay, image.grey.shape) if overlay is not None else None
    picture = compose(image.grey, mask, overlay.kind if overlay is not None else "mask")
    lines = [CAPTION + " - AI triage preview"]
    if details:
        lines.append(details)
    picture = add_caption(picture, lines)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def finding_caption(finding: dict[str, Any], kind: str) -> str:
    """The second caption line: model, version, finding and probability, and a synthetic warning."""
    window = "brain window 0-80 HU  " if kind == "ct" else ""
    text = (
        f"{window}{finding.get('model', '')} {finding.get('model_version', '')}: {finding.get('label', '')} "
        f"p={float(finding.get('probability', 0.0)):.2f}"
    )
    if finding.get("synthetic"):
        text += "  (synthetic model)"
    return text


def study_preview(
    engine: Engine,
    store: Store,
    study_uid: str,
    findings: list[dict[str, Any]],
    routing: Sequence[dict[str, Any] | None],
    finding_index: int | None = None,
) -> bytes:
    """Render the preview the study page shows.

    With `finding_index`, that finding's key slice or radiograph with its overlay. Without, the first finding that
    has an overlay; failing that, the middle image of the first analysed series (or of the first series) alone.

    Raises:
        NotFoundError: when the finding index is out of range, or nothing in the study can be previewed.
        InvalidStudyError: when the stored file cannot be decoded.
    """
    if finding_index is not None and not 0 <= finding_index < len(findings):
        raise NotFoundError(f"study {study_uid!r} has no finding number {finding_index} (it has {len(findings)})")
    candidates = [finding_index] if finding_index is not None else list(range(len(findings)))
    for index in candidates:
        finding = findings[index]
        if not finding.get("overlay_file"):
            continue
        overlay = load_overlay(store, study_uid, str(finding["overlay_file"]))
        image = read_preview_image(instance_key_of(engine, study_uid, overlay.sop_instance_uid), source=store)
        return render_png(image, overlay, finding_caption(finding, image.kind))
    chosen = findings[finding_index] if finding_index is not None else None
    series_uids = [r["series_uid"] for r in routing if r and r.get("model")]
    series_uids += [r["series_uid"] for r in routing if r and not r.get("model")]
    if chosen is not None and chosen.get("series_uid"):
        series_uids.insert(0, str(chosen["series_uid"]))
    for series_uid in series_uids:
        files = series_files(engine, study_uid, series_uid)
        if not files:
            continue
        _, key = middle_instance(files, store)
        try:
            image = read_preview_image(key, source=store)
        except (InvalidStudyError, ValueError, TypeError) as exc:
            log.info("study %s: series %s cannot be previewed: %s", study_uid, series_uid, exc)
            continue
        details = finding_caption(chosen, image.kind) + "  (no region stored)" if chosen else "no AI region"
        return render_png(image, None, details)
    raise NotFoundError(f"study {study_uid!r} has no image that can be previewed")
