"""Chest radiograph pipeline: read one frontal image, pad/resize/normalise it, classify, and map the heatmap back."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from triage.dicom.radiograph import Radiograph, read_image_file, select_radiograph
from triage.domain import Finding, Overlay, SeriesInfo
from triage.errors import InferenceError, InvalidStudyError
from triage.models.card import ModelCard
from triage.models.runtime import OnnxModel
from triage.pipelines.base import ModelPipeline
from triage.storage import InstanceSource

# What the card's inputs.preprocessing may say, and the values used when it says nothing.
DEFAULT_PREPROCESSING: dict[str, Any] = {
    "image_size": [256, 256],  # (rows, cols) of the network input
    "keep_aspect": "pad",  # pad the shorter side (symmetrically) to a square before resizing
    "pad_value": 0.0,  # presentation value of the padding: 0 is black, like air outside the body
    "resize_mode": "area",  # area averaging: an anti-aliased downsample
    "normalise": "zscore",  # per-image zero mean, unit variance (MONAI NormalizeIntensity)
}
DEFAULT_OVERLAY_MAX_PX = 256
SYNTHETIC_NOTICE = (
    "Synthetic demonstration model: trained only on synthetic radiographs, not validated, not for clinical use."
)


@dataclass
class PreparedRadiograph:
    """The network input for one radiograph and what is needed to map outputs back onto it.

    Attributes:
        image: float32 (1, H, W), normalised network input.
        sop_instance_uid: the radiograph that was read.
        rows: rows of the original image.
        cols: columns of the original image.
        pad_before: (rows, cols) of padding added before the image on the square canvas, in original pixels.
        canvas: side of the square canvas in original pixels.
        view_position: the image's View Position ("" when absent).
        selection: why this image was chosen from the series.
    """

    image: np.ndarray
    sop_instance_uid: str
    rows: int
    cols: int
    pad_before: tuple[int, int]
    canvas: int
    view_position: str
    selection: str


@dataclass
class RadiographOutput:
    """Raw network outputs for one radiograph: probability, and the heatmap (h, w) in logit units."""

    probability: float
    member_probabilities: list[float]
    heatmap: np.ndarray


def preprocessing_params(preprocessing: Mapping[str, Any] | None) -> dict[str, Any]:
    """The card's preprocessing merged over the defaults, checked.

    Raises:
        ValueError: for an unknown key or value.
    """
    given = dict(preprocessing or {})
    unknown = set(given) - set(DEFAULT_PREPROCESSING)
    if unknown:
        raise ValueError(f"unknown preprocessing key(s) {sorted(unknown)}; known: {sorted(DEFAULT_PREPROCESSING)}")
    params = {**DEFAULT_PREPROCESSING, **given}
    size = params["image_size"]
    if not isinstance(size, list | tuple) or len(size) != 2 or min(int(s) for s in size) < 16:
        raise ValueError(f"image_size={size!r}; expected [rows, cols], each at least 16")
    params["image_size"] = [int(s) for s in size]
    if params["keep_aspect"] not in ("pad", "stretch"):
        raise ValueError(f"keep_aspect={params['keep_aspect']!r}; valid: 'pad', 'stretch'")
    if params["normalise"] not in ("zscore", "none"):
        raise ValueError(f"normalise={params['normalise']!r}; valid: 'zscore', 'none'")
    return params


class RadiographPreprocess:
    """MONAI transforms from the card's preprocessing: pad to square, resize, normalise.

    Training uses the same object (built from the same parameters) so that the service sees what the model saw.
    """

    def __init__(self, preprocessing: Mapping[str, Any] | None = None) -> None:
        from monai.transforms import NormalizeIntensity, Resize

        self.params = preprocessing_params(preprocessing)
        self._resize = Resize(spatial_size=tuple(self.params["image_size"]), mode=self.params["resize_mode"])
        self._normalise = NormalizeIntensity() if self.params["normalise"] == "zscore" else None

    def __call__(self, radiograph: Radiograph) -> tuple[np.ndarray, tuple[int, int], int]:
        """Transform a radiograph's pixels.

        Returns:
            (image (1, H, W) float32, pad_before (rows, cols) in original pixels, square canvas side in pixels).
        """
        from monai.transforms import SpatialPad

        pixels: Any = np.asarray(radiograph.pixels, dtype=np.float32)[None]
        rows, cols = pixels.shape[1:]
        if self.params["keep_aspect"] == "pad":
            canvas = max(rows, cols)
            pad_before = ((canvas - rows) // 2, (canvas - cols) // 2)
            # SpatialPad "symmetric" puts floor(difference / 2) before the image, as pad_before assumes.
            pixels = SpatialPad(spatial_size=(canvas, canvas), method="symmetric", value=self.params["pad_value"])(
                pixels
            )
        else:
            canvas, pad_before = max(rows, cols), (0, 0)
        image: Any = self._resize(pixels)
        if self._normalise is not None:
            image = self._normalise(image)
        return np.asarray(image, dtype=np.float32), pad_before, canvas


class ChestRadiographPipeline(ModelPipeline):
    """Frontal chest radiograph classifier (pipeline "xr-chest-classifier").

    A series with several images is read from its first PA/AP image (or its first image when none states a view);
    the choice is recorded in the finding's details.
    """

    def __init__(self, card: ModelCard) -> None:
        super().__init__(card)
        self.transform = RadiographPreprocess(card.inputs.preprocessing)
        self.label = card.findings[0].label
        self.threshold = float(card.findings[0].threshold)
        self.heatmap_output = str(card.postprocessing.get("heatmap_output", "heatmap"))
        self.overlay_max_px = int(card.postprocessing.get("overlay_max_px", DEFAULT_OVERLAY_MAX_PX))

    def prepare_radiograph(self, radiograph: Radiograph, selection: str = "") -> PreparedRadiograph:
        """Preprocess an already-read radiograph."""
        return prepare_radiograph(self.transform, radiograph, selection)

    def load(self, series: SeriesInfo, source: InstanceSource | None = None) -> Any:
        """Pick the frontal image of the series and read it from `source` (Modality and VOI LUTs applied)."""
        key, selection = select_radiograph(series.files, source)
        return read_image_file(key, source), selection

    def preprocess(self, series: Any) -> PreparedRadiograph:
        """Pad, resize and normalise what `load` returned (or load a SeriesInfo first)."""
        image, selection = self.load(series) if isinstance(series, SeriesInfo) else series
        return prepare_radiograph(self.transform, image, selection)

    def model_inputs(self, prepared: PreparedRadiograph) -> tuple[list[np.ndarray], None]:
        """One item: the normalised image (1, H, W)."""
        return [prepared.image.astype(np.float32, copy=False)], None

    def reduce_members(self, outputs: list[dict[str, np.ndarray]]) -> tuple[list[float], np.ndarray]:
        """Each member's sigmoid probability and the members' mean heatmap (h, w) in logit units.

        Raises:
            InferenceError: when a member lacks the outputs the card names.
        """
        logit_name = self.card.outputs.tensor.name
        probabilities: list[float] = []
        heatmaps: list[np.ndarray] = []
        for member_outputs in outputs:
            if logit_name not in member_outputs or self.heatmap_output not in member_outputs:
                raise InferenceError(
                    f"{self.card.key}: a member outputs {sorted(member_outputs)}; "
                    f"the card expects {logit_name!r} and {self.heatmap_output!r}"
                )
            probabilities.append(_sigmoid(float(np.asarray(member_outputs[logit_name]).reshape(-1)[0])))
            heatmap = np.asarray(member_outputs[self.heatmap_output], dtype=np.float32)
            heatmaps.append(heatmap.reshape(heatmap.shape[-2:]))
        return probabilities, np.mean(heatmaps, axis=0).astype(np.float32)

    def assemble(
        self, prepared: PreparedRadiograph, context: None, reduced: list[Any], members: Sequence[OnnxModel]
    ) -> RadiographOutput:
        """The probability is the mean of the members' sigmoid probabilities."""
        ((probabilities, heatmap),) = reduced
        return RadiographOutput(
            probability=float(np.mean(probabilities)), member_probabilities=probabilities, heatmap=heatmap
        )

    def postprocess(self, prepared: PreparedRadiograph, raw: RadiographOutput, series: SeriesInfo) -> list[Finding]:
        probability = float(raw.probability)
        details: dict[str, Any] = {
            "view": prepared.view_position or "unknown",
            "image": prepared.sop_instance_uid,
            "image_selection": prepared.selection,
            "members": len(raw.member_probabilities),
            "threshold": self.threshold,
        }
        if self.card.synthetic:
            details["synthetic_model_notice"] = self.card.notice or SYNTHETIC_NOTICE
        return [
            Finding(
                label=self.label,
                probability=probability,
                flagged=probability >= self.threshold,
                model=self.card.name,
                model_version=self.card.version,
                synthetic=self.card.synthetic,
                series_uid=series.series_uid,
                details=details,
                overlay=heatmap_overlay(prepared, raw.heatmap, self.overlay_max_px),
            )
        ]


def prepare_radiograph(
    transform: RadiographPreprocess, radiograph: Radiograph, selection: str = ""
) -> PreparedRadiograph:
    """Run the preprocessing transform on a radiograph and keep what postprocessing needs to map back."""
    image, pad_before, canvas = transform(radiograph)
    return PreparedRadiograph(
        image=image,
        sop_instance_uid=radiograph.sop_instance_uid,
        rows=radiograph.rows,
        cols=radiograph.cols,
        pad_before=pad_before,
        canvas=canvas,
        view_position=radiograph.view_position,
        selection=selection,
    )


def prepare_files(transform: RadiographPreprocess, files: Sequence[str]) -> PreparedRadiograph:
    """Pick the frontal image among a series' (or a case's) files, read it and preprocess it.

    Training and evaluation call this with the same transform parameters the card gives the service.

    Raises:
        InvalidStudyError: when there is no file or the chosen one cannot be read.
        UnsupportedInputError: when the chosen image is colour or multi-frame.
    """
    path, selection = select_radiograph(files)
    return prepare_radiograph(transform, read_image_file(path), selection)


def heatmap_overlay(
    prepared: PreparedRadiograph, heatmap_logits: np.ndarray, max_px: int = DEFAULT_OVERLAY_MAX_PX
) -> Overlay:
    """Map a heatmap on the padded square canvas back onto the radiograph's own pixel grid.

    Args:
        prepared: the preprocessing record (canvas size and padding in original pixels).
        heatmap_logits: (h, w) class activation map in logit units over the whole canvas.
        max_px: the overlay's longer side is at most about this many pixels; stride = ceil(max(rows, cols) / max_px).

    Returns:
        An Overlay with a float32 (ceil(rows/stride), ceil(cols/stride)) mask of probabilities in [0, 1].
    """
    from scipy import ndimage

    if heatmap_logits.ndim != 2 or min(heatmap_logits.shape) < 1:
        raise InvalidStudyError(f"heatmap has shape {heatmap_logits.shape}; expected (h, w)")
    stride = max(1, math.ceil(max(prepared.rows, prepared.cols) / max(1, max_px)))
    out_rows, out_cols = math.ceil(prepared.rows / stride), math.ceil(prepared.cols / stride)
    canvas_px = math.ceil(prepared.canvas / stride)
    zoom = (canvas_px / heatmap_logits.shape[0], canvas_px / heatmap_logits.shape[1])
    upsampled = ndimage.zoom(heatmap_logits.astype(np.float64), zoom, order=1, mode="nearest", grid_mode=True)
    top, left = prepared.pad_before[0] // stride, prepared.pad_before[1] // stride
    cropped = upsampled[top : top + out_rows, left : left + out_cols]
    if cropped.shape != (out_rows, out_cols):  # rounding at the canvas edge: pad with the edge values
        cropped = np.pad(cropped, ((0, out_rows - cropped.shape[0]), (0, out_cols - cropped.shape[1])), mode="edge")
    mask = 1.0 / (1.0 + np.exp(-cropped))
    return Overlay(
        sop_instance_uid=prepared.sop_instance_uid, mask=mask.astype(np.float32), stride=stride, kind="heatmap"
    )


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + math.exp(-x))) if x >= 0 else float(math.exp(x) / (1.0 + math.exp(x)))


def stack_prepared(items: Sequence[PreparedRadiograph]) -> np.ndarray:
    """A batch (N, 1, H, W) from prepared radiographs (for training and evaluation)."""
    return np.stack([p.image for p in items]).astype(np.float32)
