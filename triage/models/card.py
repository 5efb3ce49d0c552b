"""The model card: every fact about an installed model, read from weights/<name>/<version>/card.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from triage.errors import ModelLoadError
from triage.models.intended_use import IntendedUse, UseCheck, check_intended_use


class TensorSpec(BaseModel):
    """One ONNX graph input or output as the card promises it. `None` in `shape` marks a dynamic axis."""

    name: str
    shape: list[int | None]
    dtype: str = "float32"


class WeightsFile(BaseModel):
    """One weights file of the model (an ensemble has several), with the sha256 the registry checks."""

    file: str
    sha256: str


class FindingCode(BaseModel):
    """A coded concept for the finding (SNOMED CT preferred), written into the DICOM SR and SEG as its finding type."""

    value: str
    scheme: str
    meaning: str


class FindingSpec(BaseModel):
    """A study-level finding the model reports, its operating threshold and how the probability is derived."""

    label: str
    threshold: float
    description: str = ""
    probability_method: str = ""
    code: FindingCode | None = None


class Figure(BaseModel):
    """A measured figure: what, value, unit, and how and where it was measured. Never an asserted number."""

    name: str
    value: float | str
    unit: str = ""
    measured_on: str = ""
    source: str = ""  # the command that produced it


class CardInputs(BaseModel):
    """What the model takes: modalities and body parts (BodyPartExamined values) it was made for, the rest of its
    intended use (view, age band, spacing, thickness; checked on each series before it runs), the graph input
    and the preprocessing it expects."""

    modality: list[str]
    body_part: list[str] = Field(default_factory=list)
    intended_use: IntendedUse = Field(default_factory=IntendedUse)
    tensor: TensorSpec
    preprocessing: dict[str, Any] = Field(default_factory=dict)


class CardOutputs(BaseModel):
    tensor: TensorSpec
    labels: list[str]


class Ensemble(BaseModel):
    """How many members run by default, per device kind (the setting `inference.ensemble_members` overrides)."""

    members: int = 1
    default_cpu: int = 1
    default_gpu: int = 1


class RuntimeSpec(BaseModel):
    """How the model may be run: which execution providers, and reduced precision with the parity it must keep.

    A session in fp16 (TensorRT) or bf16 (OpenVINO on a CPU with bf16 units) is checked at load against fp32 on a
    probe input; past its tolerance (max |difference| of any output) it is rebuilt in fp32.
    """

    providers: list[str] = Field(default_factory=list)  # allowed providers; empty: any the settings name
    fp16: bool = False
    fp16_parity_tolerance: float = 0.0
    fp16_parity_reason: str = ""
    bf16: bool = False
    bf16_parity_tolerance: float = 0.0
    bf16_parity_reason: str = ""


class Validation(BaseModel):
    """What validation the model has had, as the card declares it.

    status: "none" (never validated on labelled real studies: synthetic-data models, pipeline checks only),
    "external" (its authors' or a third party's published evaluation, not on this service's sites) or "local"
    (validated by this service's operators; the per-site reports live with the model's state, not here).
    """

    status: Literal["none", "external", "local"] = "none"
    summary: str = ""
    references: list[str] = Field(default_factory=list)


class ModelCard(BaseModel):
    """A model's card. Code reads model facts from here; nothing about a model is hard-coded elsewhere."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    task: str
    pipeline: str  # which pipeline implementation in triage.pipelines runs it
    summary: str
    synthetic: bool
    intended_use: str
    inputs: CardInputs
    outputs: CardOutputs
    findings: list[FindingSpec]
    weights: list[WeightsFile]
    ensemble: Ensemble = Field(default_factory=Ensemble)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    postprocessing: dict[str, Any] = Field(default_factory=dict)
    training_data: str
    evaluation_data: str
    figures: list[Figure] = Field(default_factory=list)
    limitations: list[str] = Field(default_factory=list)
    validation: Validation = Field(default_factory=Validation)
    licence: str
    provenance: dict[str, Any] = Field(default_factory=dict)
    notice: str = ""

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    def check_use(self, attributes: dict[str, Any]) -> UseCheck:
        """Whether a series (its header attributes) is within this model's intended use."""
        return check_intended_use(self.inputs.modality, self.inputs.body_part, self.inputs.intended_use, attributes)

    def finding(self, label: str) -> FindingSpec:
        for spec in self.findings:
            if spec.label == label:
                return spec
        raise KeyError(f"model {self.key} reports no finding {label!r}; it reports {[f.label for f in self.findings]}")


def read_card(path: Path) -> ModelCard:
    """Read and validate a card.json.

    Raises:
        ModelLoadError: when the file is missing, is not JSON, or does not match the card schema.
    """
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"no model card at {path}") from exc
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"model card {path} is not valid JSON: {exc}") from exc
    try:
        return ModelCard.model_validate(raw)
    except ValidationError as exc:
        raise ModelLoadError(f"model card {path} does not match the card schema: {exc}") from exc


def write_card(card: ModelCard, path: Path) -> None:
    """Write a card as stable, human-diffable JSON."""
    path.write_text(json.dumps(card.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n")
