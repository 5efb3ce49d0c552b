"""Plain typed records that flow between the layers: instances, series, findings, analyses and priorities."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, field_serializer, model_validator
from pydantic.json_schema import SkipJsonSchema


def utcnow() -> datetime:
    """Now, timezone-aware in UTC: every time triage stores or compares is UTC."""
    return datetime.now(UTC)


# A time in JSON: ISO 8601 with its UTC offset ("2026-01-02T03:04:05+00:00"), as the API has always written it.
UtcTime = Annotated[datetime, PlainSerializer(lambda value: value.isoformat(), return_type=str, when_used="json")]
# A score in JSON, to 4 decimals (the rest is noise to a reader and churn to a diff).
Score = Annotated[float, PlainSerializer(lambda value: round(float(value), 4), return_type=float, when_used="json")]


class Record(BaseModel):
    """Base of the records stored as JSON and read back: unknown keys (from a newer or older release) are
    ignored, missing optional ones take their defaults, so old rows still load. `model` is a field name here,
    not pydantic's namespace."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class AIStatus(StrEnum):
    """Where the AI analysis of a study stands. A study is on the worklist whatever its AI status."""

    PENDING = "pending"
    ANALYSING = "analysing"
    DONE = "done"
    FAILED = "failed"
    NOT_APPLICABLE = "not-applicable"


class PriorityLevel(StrEnum):
    """Worklist priority levels, lowest first. `rank` orders them."""

    ROUTINE = "routine"
    URGENT = "urgent"
    STAT = "stat"

    @property
    def rank(self) -> int:
        return _LEVEL_RANK[self]

    @classmethod
    def parse(cls, value: str | None, default: PriorityLevel | None = None) -> PriorityLevel:
        """Accept our own names and the DICOM vocabularies for request priority.

        DICOM (0040,1003) Requested Procedure Priority uses STAT, HIGH, ROUTINE, MEDIUM, LOW;
        the C-STORE Priority (0000,0700) uses LOW, MEDIUM, HIGH (PS3.7 C.4.2.1.4).
        """
        if value is None or not str(value).strip():
            return default or cls.ROUTINE
        text = str(value).strip().lower()
        aliases = {
            "stat": cls.STAT,
            "critical": cls.STAT,
            "emergency": cls.STAT,
            "high": cls.URGENT,
            "urgent": cls.URGENT,
            "asap": cls.URGENT,
            "routine": cls.ROUTINE,
            "medium": cls.ROUTINE,
            "low": cls.ROUTINE,
            "normal": cls.ROUTINE,
        }
        if text not in aliases:
            raise ValueError(f"unknown priority {value!r}; valid: {sorted(aliases)}")
        return aliases[text]


_LEVEL_RANK = {PriorityLevel.ROUTINE: 0, PriorityLevel.URGENT: 1, PriorityLevel.STAT: 2}


class SkipReason(StrEnum):
    """Why a series was not analysed by any model (recorded on the study)."""

    NO_RULE = "no-rule-matched"
    LOCALIZER = "localizer"
    SECONDARY_CAPTURE = "secondary-capture"
    DOSE_REPORT = "dose-report"
    NON_IMAGE = "non-image"
    BONE_KERNEL = "bone-kernel"
    SLICE_THICKNESS = "slice-thickness-out-of-range"
    TOO_FEW_SLICES = "too-few-slices"
    MODEL_UNAVAILABLE = "model-unavailable"
    MODEL_OFF = "model-off"
    OUTSIDE_INTENDED_USE = "outside-intended-use"


@dataclass(frozen=True)
class InstanceMeta:
    """What the store indexes about one received instance: no patient names or birth dates.

    `patient_hash` is a salted hash of the Patient ID, never the ID itself. `key` names the instance in the
    store ("<study>/<series>/<sop>.dcm", see `triage.storage`); it is not a file path.
    """

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    key: str
    accession_number: str = ""
    patient_hash: str = ""
    study_description: str = ""
    series_description: str = ""
    body_part: str = ""
    requested_priority: str = ""
    calling_ae: str = ""
    institution: str = ""
    transfer_syntax_uid: str = ""
    study_date: str = ""
    study_time: str = ""
    indication: str = ""


@dataclass(frozen=True)
class SeriesInfo:
    """The attributes routing rules look at, gathered from one series' instances (values from the first one).

    `files` are the instances' store keys in arrival order (read them through an `InstanceSource`).
    """

    series_uid: str
    modality: str
    sop_class_uid: str
    n_instances: int
    files: tuple[str, ...]
    attributes: dict[str, Any] = field(default_factory=dict)


class RoutingDecision(Record):
    """For one series: which model will analyse it, or why none will.

    Routing fills the decision (`series_uid`, `model`, `rule`, `reason`); the study's record adds what the
    study page shows next to it: the series' modality, description and size, and, once its model ran, the
    outcome (`analysis`: "done" or "failed: ...") and the model version.
    """

    series_uid: str
    model: str | None = None
    rule: str | None = None
    reason: str = ""
    modality: str = ""
    description: str = ""
    n_instances: int = 0
    analysis: str | None = None
    model_version: str | None = None


@dataclass
class Overlay:
    """A small mask or heatmap that a preview can draw over one image of the study.

    `mask` is a 2-D float32 array in [0, 1] on the pixel grid of the referenced instance (rows, columns),
    possibly downsampled by an integer `stride`; `sop_instance_uid` names the slice or radiograph it belongs to.
    """

    sop_instance_uid: str
    mask: Any  # numpy.ndarray (rows, cols), float32 in [0, 1]
    stride: int = 1
    kind: str = "mask"  # "mask" or "heatmap"


@dataclass(frozen=True)
class ClinicalOrder:
    """An imaging order from the RIS (HL7 ORM^O01 / OMI^O23), as the worklist uses it; no patient identity.

    `priority` is our level ("stat", "urgent", "routine") or "" when the order named none we know.
    """

    accession_number: str
    message_type: str
    control_id: str = ""
    order_control: str = "NW"
    requested_procedure: str = ""
    priority: str = ""
    reason: str = ""
    ordering_site: str = ""
    sending_application: str = ""
    sending_facility: str = ""
    # The Study Instance UID the RIS assigned (OMI^O23 IPC-3, ZDS-1); "" when the order names none.
    study_instance_uid: str = ""


@dataclass(frozen=True)
class SliceMasks:
    """A finding's segmentation on the source series' own images: one binary mask per source image it touches.

    `masks` is (n, rows, cols) bool on the full pixel grid of the images named, in order, by `sop_instance_uids`
    (the source slices, whatever their tilt or spacing); a DICOM Segmentation is written from it.
    """

    sop_instance_uids: list[str]
    masks: Any  # numpy.ndarray (n, rows, cols) bool


class Finding(Record):
    """One study-level AI result. `synthetic` is true when the model was trained on synthetic data; `shadow` is
    true when the model ran in shadow at the study's site (kept and shown to admins, never raising the study,
    never shown to its radiologists or sent out).

    The runner fills `overlay` (a mask in memory); it is never serialised: the analysis stores it and records
    its name in `overlay_file`. `overlay_sop_instance_uid` names the image the overlay is drawn on.
    """

    label: str
    probability: float
    flagged: bool
    model: str
    model_version: str
    synthetic: bool
    shadow: bool = False
    series_uid: str = ""
    details: dict[str, Any] = Field(default_factory=dict)
    overlay_sop_instance_uid: str | None = None
    overlay_file: str | None = None
    overlay: SkipJsonSchema[Overlay | None] = Field(default=None, exclude=True, repr=False)
    # The segmentation on the source images (in memory from the runner; stored by the analysis under this name).
    segmentation_file: str | None = None
    segmentation: SkipJsonSchema[SliceMasks | None] = Field(default=None, exclude=True, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _unvalidated_before_model_states(cls, data: Any) -> Any:
        """A finding stored before model states (no `shadow` key) from a synthetic-data model reads as shadow:
        that release never let such a model raise priority by default, and this one must not start to."""
        if isinstance(data, dict) and "shadow" not in data and data.get("synthetic") is True:
            return {**data, "shadow": True}
        return data

    @model_validator(mode="after")
    def _overlay_names_its_image(self) -> Finding:
        if self.overlay is not None and not self.overlay_sop_instance_uid:
            self.overlay_sop_instance_uid = self.overlay.sop_instance_uid
        return self

    @field_serializer("probability")
    def _rounded(self, value: float) -> float:
        return round(float(value), 4)

    def carried_over(self) -> Finding:
        """This finding, marked as kept from an earlier analysis (the latest one of its model failed)."""
        return self.model_copy(update={"details": {**self.details, CARRIED_OVER: CARRIED_OVER_TEXT}})


# The detail that marks a finding kept from an earlier analysis.
CARRIED_OVER = "carried_over"
CARRIED_OVER_TEXT = "from an earlier analysis; the latest failed"


class StageTime(Record):
    """Seconds one pipeline stage took for one model on one series (stored with the analysis run)."""

    stage: str
    seconds: float
    model: str = ""
    series_uid: str = ""
    # The Ray node the stage ran on ("" in-process), and which attempt of the study's analysis this was.
    node_id: str = ""
    attempts: int = 1


@dataclass
class StageTimings:
    """Wall-clock seconds per pipeline stage, in the order they ran."""

    seconds: dict[str, float] = field(default_factory=dict)
    # The Ray node ID each stage ran on (absent in-process).
    nodes: dict[str, str] = field(default_factory=dict)

    def add(self, stage: str, elapsed_s: float, node_id: str = "") -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + float(elapsed_s)
        if node_id:
            self.nodes[stage] = node_id

    def merge(self, other: StageTimings) -> None:
        for stage, value in other.seconds.items():
            self.add(stage, value, other.nodes.get(stage, ""))


@dataclass
class SeriesResult:
    """The outcome of running one model on one series."""

    series_uid: str
    model: str
    model_version: str
    ok: bool
    findings: list[Finding] = field(default_factory=list)
    error: str = ""
    timings: StageTimings = field(default_factory=StageTimings)
    # A failure that may not happen again (a worker or node died, ran out of memory, missed its deadline):
    # the analysis is retried. A permanent one (unreadable series, unsupported input) is not.
    transient: bool = False


@dataclass
class StudyAnalysis:
    """Everything the AI produced for one study at one moment (a later analysis supersedes it)."""

    study_uid: str
    routing: list[RoutingDecision]
    results: list[SeriesResult]
    started_at: datetime
    finished_at: datetime | None = None

    @property
    def findings(self) -> list[Finding]:
        return [f for r in self.results for f in r.findings]


@dataclass(frozen=True)
class PriorityReason:
    """One reason behind a study's position, in words a radiologist can read."""

    code: str
    text: str
    level: PriorityLevel


@dataclass(frozen=True)
class Priority:
    """A study's priority level, a sortable score and every reason behind it."""

    level: PriorityLevel
    score: Score
    reasons: tuple[PriorityReason, ...]
