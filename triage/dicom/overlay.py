"""The one renderer of AI overlays: a stored image as a viewer shows it, the AI region in red over it, and the
burned-in "NOT FOR DIAGNOSTIC USE" caption. The study page's preview PNG and the Secondary Capture sent to PACS
are both drawn here, so what a radiologist sees on the page is what PACS receives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from triage.dicom.radiograph import radiograph_from_dataset
from triage.dicom.store import check_decode_limits
from triage.domain import Overlay
from triage.errors import InvalidStudyError, UnsupportedInputError

# Brain window (PS3.3 C.11.2.1.2: a window of 80 HU centred on 40 HU): 0 HU black, 80 HU white. The window a
# radiologist reads a head CT for haemorrhage in.
BRAIN_WINDOW_HU = (0.0, 80.0)
# The windows a head CT is read in (low, high HU): brain (W80 L40), subdural (W200 L80: a thin collection against
# the skull stands out) and bone (W2800 L600: fractures).
WINDOWS_HU = {"brain": BRAIN_WINDOW_HU, "subdural": (-20.0, 180.0), "bone": (-800.0, 2000.0)}
CT_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1")
BURNED_IN_WARNING = "NOT FOR DIAGNOSTIC USE"
OVERLAY_RGB = (255, 40, 40)
OVERLAY_ALPHA = 0.45
# A "mask" overlay is drawn where its value is at least this; a "heatmap" is blended in proportion instead.
MASK_THRESHOLD = 0.5


@dataclass(frozen=True)
class DisplayImage:
    """A greyscale image ready to draw on: uint8 (rows, cols), 0 black, 255 white."""

    grey: np.ndarray
    sop_instance_uid: str
    kind: str  # "ct" or "radiograph"


def display_image(
    ds: Any, frame: int | None = None, source: str = "", window_hu: tuple[float, float] | None = None
) -> DisplayImage:
    """A decoded instance as a viewer shows it: CT in the brain window, anything else through its own Modality
    and VOI LUTs (see `radiograph_from_dataset`). An Enhanced CT shows `frame` (the middle one by default).

    Raises:
        InvalidStudyError: when there is no decodable pixel data.
        UnsupportedInputError: for a colour CT image, or a multi-frame radiograph.
    """
    from pydicom.pixels import apply_modality_lut

    uid = str(ds.get("SOPInstanceUID", ""))
    source = source or uid or "instance"
    is_ct = str(ds.get("Modality", "")).upper() == "CT" or str(ds.get("SOPClassUID", "")) in CT_SOP_CLASSES
    if not is_ct:
        return DisplayImage(_to_uint8(radiograph_from_dataset(ds, source=source).pixels, 0.0, 1.0), uid, "radiograph")
    if "PixelData" not in ds:
        raise InvalidStudyError(f"CT instance {source} has no pixel data")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise UnsupportedInputError(
            f"CT instance {source} has SamplesPerPixel={ds.get('SamplesPerPixel')}; an overlay is drawn on a"
            " greyscale slice"
        )
    check_decode_limits(ds)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise a variety of errors on corrupt data
        raise InvalidStudyError(f"CT instance {source}: pixel data cannot be decoded ({exc})") from exc
    if pixels.ndim == 3:  # Enhanced CT: one frame; the middle one unless the caller says which
        index = frame if frame is not None and 0 <= frame < pixels.shape[0] else pixels.shape[0] // 2
        hu = _enhanced_frame_hu(ds, pixels, index)
    else:
        hu = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    return DisplayImage(_to_uint8(hu, *(window_hu or BRAIN_WINDOW_HU)), uid, "ct")


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
    """The overlay on the image's pixel grid: float32 (rows, cols) in [0, 1].

    The stored mask is the image downsampled by an integer `stride`: each mask pixel covers stride x stride image
    pixels. The upsampled mask is cropped or zero-padded by less than one stride to the image size.

    Raises:
        InvalidStudyError: when the mask is not 2-D, the stride is not positive, or the mask does not fit.
    """
    mask = np.clip(np.nan_to_num(np.asarray(overlay.mask, dtype=np.float32)), 0.0, 1.0)
    if mask.ndim != 2:
        raise InvalidStudyError(f"overlay mask has shape {mask.shape}; expected (rows, cols)")
    stride = int(overlay.stride)
    if stride < 1:
        raise InvalidStudyError(f"overlay stride {overlay.stride!r} is not a positive integer")
    full = np.repeat(np.repeat(mask, stride, axis=0), stride, axis=1)
    rows, cols = shape
    if full.shape[0] + stride <= rows or full.shape[1] + stride <= cols or full.shape[0] > rows + stride:
        raise InvalidStudyError(f"overlay mask {mask.shape} with stride {stride} does not fit the image {shape}")
    out = np.zeros(shape, dtype=np.float32)
    out[: min(rows, full.shape[0]), : min(cols, full.shape[1])] = full[:rows, :cols]
    return out


def draw_overlay(grey: np.ndarray, mask: np.ndarray | None, kind: str = "mask") -> np.ndarray:
    """Draw `mask` over the greyscale image: a red translucent fill and a solid red contour.

    Args:
        grey: uint8 (rows, cols).
        mask: float32 (rows, cols) in [0, 1] on the same grid, or None.
        kind: "mask" fills where the value is at least MASK_THRESHOLD; "heatmap" blends in proportion to it.

    Returns:
        uint8 RGB (rows, cols, 3); without a mask (or an empty one) the grey image in RGB.
    """
    rgb = np.repeat(np.asarray(grey, dtype=np.float32)[..., None], 3, axis=2)
    if mask is not None and mask.any():
        inside = mask >= MASK_THRESHOLD
        alpha = np.clip(mask, 0.0, 1.0) * OVERLAY_ALPHA if kind == "heatmap" else inside * OVERLAY_ALPHA
        colour = np.asarray(OVERLAY_RGB, dtype=np.float32)
        rgb = rgb * (1.0 - alpha[..., None]) + colour * alpha[..., None]
        edge = inside & ~ndimage.binary_erosion(inside, iterations=1)
        thickness = round(max(mask.shape) / 400)
        if thickness > 0:  # iterations=0 would mean "dilate until nothing changes" in scipy
            edge = ndimage.binary_dilation(edge, iterations=thickness)
        rgb[edge] = colour
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def caption_band(lines: Sequence[str], width: int) -> np.ndarray:
    """A black band with the first line in white and the others in light grey: uint8 (band_rows, width, 3)."""
    size = max(12, width // 40)
    small_size = max(10, size * 3 // 4)
    font, small = _font(size), _font(small_size)
    rows = size + 12 + (len(lines) - 1) * small_size + 8 * len(lines)
    band = Image.new("RGB", (width, rows), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    y = 6
    for i, line in enumerate(lines):
        draw.text((8, y), line, fill=(255, 255, 255) if i == 0 else (190, 190, 190), font=font if i == 0 else small)
        y += (size if i == 0 else small_size) + 8
    return np.asarray(band, dtype=np.uint8)


def _resized(grey: np.ndarray, mask: np.ndarray | None, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """The image (Lanczos when shrinking, bilinear when enlarging) and its mask (bilinear) at `size` (w, h)."""
    shrink = size[0] < grey.shape[1]
    image = Image.fromarray(grey, mode="L").resize(
        size, Image.Resampling.LANCZOS if shrink else Image.Resampling.BILINEAR
    )
    scaled = None
    if mask is not None:
        scaled = np.asarray(Image.fromarray(mask, mode="F").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    return np.asarray(image, dtype=np.uint8), scaled


def render_overlay(
    image: DisplayImage,
    overlay: Overlay | None,
    caption: Sequence[str],
    fit_px: tuple[int, int] | None = None,
) -> tuple[np.ndarray, int]:
    """The image with the overlay drawn over it and a caption band on top whose first line is
    "NOT FOR DIAGNOSTIC USE".

    Args:
        image: the image as a viewer shows it.
        overlay: the AI region on that image's pixel grid (possibly downsampled by its stride), or None.
        caption: the lines under the warning (model, finding, probability; the window).
        fit_px: (smallest, largest) longer side: the picture is scaled into that range (the page's preview);
            None keeps the image's own pixel grid (the capture sent to PACS).

    Returns:
        (rgb, band_rows): uint8 (band_rows + rows, cols, 3), and how many rows the caption band takes.

    Raises:
        InvalidStudyError: when the overlay does not fit the image.
    """
    grey = image.grey
    mask = mask_on_image(overlay, grey.shape) if overlay is not None else None
    if fit_px is not None:
        smallest, largest = fit_px
        longest = max(grey.shape)
        scale = largest / longest if longest > largest else max(1.0, smallest / longest)
        if scale != 1.0:
            size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
            grey, mask = _resized(grey, mask, size)
    picture = draw_overlay(grey, mask, overlay.kind if overlay is not None else "mask")
    band = caption_band([BURNED_IN_WARNING, *caption], picture.shape[1])
    return np.concatenate([band, picture], axis=0), band.shape[0]
