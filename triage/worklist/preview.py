"""Preview PNGs for the study page: which image of a study to show (the key CT slice or the radiograph) and
with which AI region; drawn by the one overlay renderer, `triage.dicom.overlay`.

A preview is a triage aid rendered from the stored DICOM, never a diagnostic image: every PNG carries the caption
"NOT FOR DIAGNOSTIC USE" burnt into the pixels, and no patient identifiers.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from triage.dicom.overlay import DisplayImage, display_image, render_overlay
from triage.dicom.results import finding_caption as overlay_caption
from triage.domain import Finding, Overlay, RoutingDecision
from triage.errors import InvalidStudyError, NotFoundError, TriageError
from triage.storage import InstanceSource, PathSource, Store, key_name, overlay_from_bytes
from triage.worklist.repository import Worklist
from triage.worklist.tables import Instance

log = logging.getLogger(__name__)

# The preview's longer side: large radiographs are shrunk, small CT slices enlarged so the caption fits.
MAX_SIDE_PX = 768
MIN_SIDE_PX = 512


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
) -> DisplayImage:
    """Read a stored instance (by key from `source`; a file path when None) as a display image: CT in the brain
    window, a radiograph as presented.

    Raises:
        InvalidStudyError: when the file cannot be read or decoded.
    """
    import pydicom

    name = key_name(str(path))
    reader = source if source is not None else PathSource()
    try:
        with reader.open(str(path)) as handle:
            ds = pydicom.dcmread(handle)
    except Exception as exc:  # noqa: BLE001 - any read failure is the same to the viewer
        raise InvalidStudyError(f"{name}: not a readable DICOM file ({exc})") from exc
    return display_image(ds, frame, source=name)


def render_png(image: DisplayImage, overlay: Overlay | None, details: str = "") -> bytes:
    """The preview as PNG bytes, captioned "NOT FOR DIAGNOSTIC USE" (and `details` on a second line), scaled so
    its longer side lies between MIN_SIDE_PX and MAX_SIDE_PX."""
    rgb, _ = render_overlay(image, overlay, [details or "AI triage preview"], fit_px=(MIN_SIDE_PX, MAX_SIDE_PX))
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def finding_caption(finding: Finding, kind: str) -> str:
    """The second caption line: the window for CT, then model, version, finding and probability, and a synthetic
    warning (as on the overlay captures sent to PACS)."""
    window = "brain window 0-80 HU  " if kind == "ct" else ""
    return window + overlay_caption(finding)


def study_preview(
    engine: Engine,
    store: Store,
    study_uid: str,
    findings: Sequence[Finding],
    routing: Sequence[RoutingDecision],
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
        if not finding.overlay_file:
            continue
        overlay = load_overlay(store, study_uid, finding.overlay_file)
        image = read_preview_image(instance_key_of(engine, study_uid, overlay.sop_instance_uid), source=store)
        return render_png(image, overlay, finding_caption(finding, image.kind))
    chosen = findings[finding_index] if finding_index is not None else None
    series_uids = [r.series_uid for r in routing if r.model] + [r.series_uid for r in routing if not r.model]
    if chosen is not None and chosen.series_uid:
        series_uids.insert(0, chosen.series_uid)
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


def preview_png(
    worklist: Worklist,
    store: Store,
    study_uid: str,
    finding_index: int | None,
    now: datetime,
    include_shadow: bool = False,
) -> bytes:
    """The study page's preview PNG of one study (see `study_preview`); it is an image of a patient: never cache it.

    Without `include_shadow` (a radiologist) the findings of models in shadow at the study's site do not exist
    here: they are stored after the active ones, so the numbers of the others are the same in both views.

    Raises:
        NotFoundError: unknown study or finding, or nothing to preview.
        InvalidStudyError: when the image cannot be read or drawn (quoting why).
    """
    detail = worklist.get_study(study_uid, now)
    # A series not routed yet counts as one no model analyses.
    routing = [s.routing or RoutingDecision(series_uid=s.series_uid) for s in detail.series]
    try:
        findings = detail.findings if include_shadow else [f for f in detail.findings if not f.shadow]
        return study_preview(worklist.engine, store, study_uid, findings, routing, finding_index)
    except TriageError:
        raise
    except Exception as exc:  # noqa: BLE001 - a preview failure must not look like a server crash
        log.exception("study %s: preview failed", study_uid)
        raise PreviewError(f"preview cannot be rendered: {exc}") from exc


class PreviewError(InvalidStudyError):
    """The stored image or overlay could not be drawn as a preview."""


def _position_along_normal(header: Any) -> float:
    """Where a slice lies along its normal (mm), for ordering a series as a scroller shows it."""
    position = header.get("ImagePositionPatient")
    orientation = header.get("ImageOrientationPatient")
    if position is None or orientation is None or len(orientation) != 6:
        return float(header.get("InstanceNumber", 0) or 0)
    row, col = np.array(orientation[:3], dtype=float), np.array(orientation[3:], dtype=float)
    return float(np.dot(np.cross(row, col), np.array(position, dtype=float)))


def series_slices(worklist: Worklist, store: Store, study_uid: str, series_uid: str) -> list[tuple[str, str]]:
    """(SOP Instance UID, store key) of a series' images in order along the slice normal (headers read once per
    series and number of instances)."""
    files = series_files(worklist.engine, study_uid, series_uid)
    if not files:
        raise NotFoundError(f"study {study_uid!r} has no series {series_uid!r}")
    return list(_ordered(tuple(files), store))


_PLACEMENT_TAGS = ["ImagePositionPatient", "ImageOrientationPatient", "InstanceNumber"]
_ORDER_CACHE: dict[tuple[tuple[str, str], ...], list[tuple[str, str]]] = {}


def _ordered(files: tuple[tuple[str, str], ...], store: Store) -> list[tuple[str, str]]:
    cached = _ORDER_CACHE.get(files)
    if cached is not None:
        return cached
    import pydicom

    placed = []
    for uid, key in files:
        try:
            with store.open(key) as handle:
                header = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=_PLACEMENT_TAGS)
            placed.append((_position_along_normal(header), uid, key))
        except Exception:  # noqa: BLE001 - an unreadable header goes last rather than hiding the series
            placed.append((float("inf"), uid, key))
    ordered = [(uid, key) for _, uid, key in sorted(placed)]
    if len(_ORDER_CACHE) > 64:
        _ORDER_CACHE.clear()
    _ORDER_CACHE[files] = ordered
    return ordered


def slice_png(
    worklist: Worklist,
    store: Store,
    study_uid: str,
    series_uid: str,
    index: int,
    window: str = "brain",
    overlay: bool = True,
    include_shadow: bool = False,
) -> bytes:
    """One image of a series for the study page's scroller: in `window` (brain, subdural, bone; radiographs as
    presented), with the AI's segmentation or overlay of that image drawn when `overlay` (findings of models in
    shadow only for `include_shadow`). Captioned "NOT FOR DIAGNOSTIC USE".

    Raises:
        NotFoundError: no such series or image index.
        ValueError: an unknown window.
        InvalidStudyError: the image cannot be decoded.
    """
    import pydicom

    from triage.dicom.overlay import WINDOWS_HU
    from triage.storage import segmentation_from_bytes

    if window not in WINDOWS_HU:
        raise ValueError(f"unknown window {window!r}; valid: {sorted(WINDOWS_HU)}")
    slices = series_slices(worklist, store, study_uid, series_uid)
    if not 0 <= index < len(slices):
        raise NotFoundError(f"series {series_uid!r} has {len(slices)} images; no image {index}")
    sop_uid, key = slices[index]
    with store.open(key) as handle:
        ds = pydicom.dcmread(handle)
    image = display_image(ds, source=key_name(key), window_hu=WINDOWS_HU[window])
    drawn: Overlay | None = None
    caption = f"image {index + 1} of {len(slices)}, {window} window"
    if overlay:
        detail = worklist.get_study(study_uid, datetime.now().astimezone())
        for finding in detail.findings:
            if finding.shadow and not include_shadow:
                continue
            try:
                if finding.segmentation_file and finding.series_uid == series_uid:
                    masks = segmentation_from_bytes(store.get_overlay(study_uid, finding.segmentation_file))
                    if sop_uid in masks.sop_instance_uids:
                        mask = masks.masks[masks.sop_instance_uids.index(sop_uid)].astype(np.float32)
                        drawn = Overlay(sop_uid, mask, 1)
                elif finding.overlay_file:
                    candidate = load_overlay(store, study_uid, finding.overlay_file)
                    if candidate.sop_instance_uid == sop_uid:
                        drawn = candidate
            except TriageError as exc:
                log.warning("study %s: AI region of %s not drawn: %s", study_uid, finding.label, exc)
            if drawn is not None:
                caption += f"; AI: {finding.label.replace('_', ' ')} ({finding.model} {finding.model_version})"
                break
    return render_png(image, drawn, caption)
