"""Intended use from the card, checked against a series' header before the model runs on it (pure, no I/O).

A model gives a confident number whatever it is shown: a child's film, a lateral view, an abdomen. The card
declares what the model was made for (modality, body part, view, age band, pixel spacing, slice thickness); a
series outside it is not analysed, and the worklist says why in words. Real headers are messy: an attribute
that is missing is allowed or refused as the card says (`when_missing`), and the choice is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Missing = Literal["allow", "refuse"]

# ViewPosition (0018,5101) values, in words.
_VIEW_WORDS = {"LL": "left lateral", "RL": "right lateral", "LAT": "lateral", "PA": "PA", "AP": "AP"}


class Range(BaseModel):
    """A closed interval; a missing end is open."""

    model_config = ConfigDict(extra="forbid")

    min: float | None = None
    max: float | None = None

    def holds(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def words(self, unit: str) -> str:
        if self.min is not None and self.max is not None:
            return f"{self.min:g}-{self.max:g} {unit}"
        if self.min is not None:
            return f"{self.min:g} {unit} or more"
        return f"up to {self.max:g} {unit}"


class IntendedUse(BaseModel):
    """What a model was made for, beyond the card's modality and body part lists.

    `when_missing` names, per check ("body_part", "view", "age", "pixel_spacing", "slice_thickness"), what to do
    when the header lacks the attribute: "allow" (the default: analysed, the assumption recorded) or "refuse".
    """

    model_config = ConfigDict(extra="forbid")

    views: list[str] = Field(default_factory=list)  # ViewPosition values; empty: any view
    age_years: Range | None = None
    age_words: str = ""  # how the age band reads to a radiologist: "adults"
    pixel_spacing_mm: Range | None = None
    slice_thickness_mm: Range | None = None
    when_missing: dict[str, Missing] = Field(default_factory=dict)


@dataclass(frozen=True)
class UseCheck:
    """The outcome: `refusals` (empty: within intended use) and `assumptions` made for missing attributes."""

    refusals: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refusals

    def text(self) -> str:
        """The refusal as the worklist shows it."""
        return "outside the model's intended use: " + "; ".join(self.refusals)


def _age_words(years: float) -> str:
    if years < 2:
        return f"{years * 12:.0f} months"
    return f"{years:.0f} y"


def check_intended_use(
    modalities: list[str], body_parts: list[str], use: IntendedUse, attributes: dict[str, Any]
) -> UseCheck:
    """Whether a series (its header `attributes`, as `triage.dicom.series.read_series_attributes` gives them) is
    within a model's intended use.

    Args:
        modalities: The card's modalities (inputs.modality).
        body_parts: The card's body parts (inputs.body_part); empty: any.
        use: The card's intended-use checks.
        attributes: Modality, BodyPartExamined, ViewPosition, PatientAgeYears, PixelSpacingMm, SliceThickness.

    Returns:
        What refused the series (in words a radiologist reads) and what was assumed for missing attributes.
    """
    refusals: list[str] = []
    assumptions: list[str] = []

    def missing(check: str, what: str) -> None:
        if use.when_missing.get(check, "allow") == "refuse":
            refusals.append(f"{what} not in the header, which the model requires")
        else:
            assumptions.append(f"{what} not in the header: analysed, as the card allows")

    modality = str(attributes.get("Modality") or "").upper()
    if modalities and modality and modality not in modalities:
        refusals.append(f"modality {modality}, model is for {', '.join(modalities)}")

    if body_parts:
        part = str(attributes.get("BodyPartExamined") or "").strip().upper()
        if not part:
            missing("body_part", "body part")
        elif part not in [p.upper() for p in body_parts]:
            refusals.append(f"body part {part}, model is for {', '.join(body_parts)}")

    if use.views:
        view = str(attributes.get("ViewPosition") or "").strip().upper()
        if not view:
            missing("view", "view position")
        elif view not in use.views:
            refusals.append(f"view {_VIEW_WORDS.get(view, view)}, model is for {', '.join(use.views)} views")

    if use.age_years is not None:
        years = attributes.get("PatientAgeYears")
        if years is None:
            missing("age", "patient age")
        elif not use.age_years.holds(float(years)):
            band = use.age_words or f"patients aged {use.age_years.words('y')}"
            refusals.append(f"patient age {_age_words(float(years))}, model is for {band}")

    for check, what, rng, key in (
        ("pixel_spacing", "pixel spacing", use.pixel_spacing_mm, "PixelSpacingMm"),
        ("slice_thickness", "slice thickness", use.slice_thickness_mm, "SliceThickness"),
    ):
        if rng is None:
            continue
        value = attributes.get(key)
        if value is None:
            missing(check, what)
        elif not rng.holds(float(value)):
            refusals.append(f"{what} {float(value):.3g} mm, model is for {rng.words('mm')}")
    return UseCheck(refusals, assumptions)
