"""Settings from the environment (prefix TRIAGE_, nested sections joined by __), passed in, never global."""

from __future__ import annotations

import os
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class ServiceRole(StrEnum):
    """What one `triage serve` process does. Any number of processes may run each role against one
    database and one store; without `--role` a process runs all three (the embedded default)."""

    API = "api"  # the HTTP API and web pages (stateless: any replica answers any request)
    INGEST = "ingest"  # the Storage SCP and STOW-RS: instances in, durable, indexed
    ANALYSIS = "analysis"  # study completion, claiming, the Ray pipeline, recording results

    @classmethod
    def parse_all(cls, values: Iterable[str]) -> frozenset[ServiceRole]:
        """The roles named in `values` (all three when empty).

        Raises:
            ValueError: naming an unknown role and the valid ones.
        """
        roles = set()
        for value in values:
            try:
                roles.add(cls(str(value).strip().lower()))
            except ValueError:
                raise ValueError(f"unknown role {value!r}; valid: {', '.join(r.value for r in cls)}") from None
        return frozenset(roles) if roles else ALL_ROLES


ALL_ROLES: frozenset[ServiceRole] = frozenset(ServiceRole)


class DicomSettings(BaseModel):
    """The DICOM boundary: storage SCP and study completion."""

    ae_title: str = "TRIAGE"
    port: int = 11112
    bind_address: str = "0.0.0.0"
    # Empty list: any calling AE title is accepted.
    allowed_calling_aets: list[str] = Field(default_factory=list)
    # A study is complete when no instance has arrived for this long (as Orthanc's StableAge).
    stable_age_s: float = 10.0
    # A study that keeps growing is analysed anyway this long after its first instance (never starved);
    # instances arriving later trigger a re-analysis that supersedes the first result.
    max_study_wait_s: float = 600.0
    # Clinical priority given to studies from a calling AE that sends none, e.g. {"ER_CT": "stat"}.
    sender_priority: dict[str, str] = Field(default_factory=dict)
    max_pdu_bytes: int = 0  # 0: unlimited
    # An open TCP connection must send its A-ASSOCIATE-RQ within this time or is dropped (the ARTIM timer,
    # PS3.8 9.1.5): idle sockets then cannot hold the service for long.
    association_request_timeout_s: float = 5.0
    # An established association that sends nothing for this long is aborted.
    association_idle_timeout_s: float = 60.0
    # Associations served at once, and at once from one peer address (PS3.8 9.3.4: more are rejected transient,
    # "local limit exceeded", and the sender retries). Connections that have not yet sent an A-ASSOCIATE-RQ do
    # not count; the request timeout frees them.
    max_associations: int = 50
    max_associations_per_peer: int = 25
    # The Called AE Title of an association must be `ae_title` (PS3.8 9.3.4: else "called AE title not
    # recognised"); False accepts any.
    require_called_aet: bool = True
    # DICOM over TLS (PS3.15 B.9, BCP 195): the SCP's certificate and key (both set: TLS on that port, plain
    # associations fail); with `tls_client_ca` senders must present a certificate that CA signed. Empty: plain
    # TCP, for a private network.
    tls_certfile: str = ""
    tls_keyfile: str = ""
    tls_client_ca: str = ""
    # Storage SOP classes accepted, as UIDs or keywords ("MRImageStorage"); empty: every standard storage class.
    accepted_sop_classes: list[str] = Field(default_factory=list)
    # Limits checked on the header before any pixels are decoded; an instance beyond them is stored and its
    # study listed, but nothing decodes it (the analysis fails with the reason).
    max_image_dimension_px: int = 16384  # Rows and Columns each
    max_frames: int = 10000  # Number of Frames
    max_decoded_bytes: int = 2 * 1024**3  # Rows x Columns x Samples x Bits Allocated x Frames, in bytes


class ResultsSettings(BaseModel):
    """Where AI results go back to (a PACS, by DICOM C-STORE): a Basic Text SR and an overlay capture per finding,
    in the same study, marked not for diagnostic use. An empty host disables it."""

    host: str = ""
    port: int = 104
    ae_title: str = "PACS"
    calling_ae: str = "TRIAGE"
    # DICOM over TLS to the PACS (PS3.15 B.9, BCP 195): its certificate checked against `tls_ca` (empty: the
    # system's CAs), ours presented when it asks (`tls_certfile`, `tls_keyfile`).
    tls: bool = False
    tls_ca: str = ""
    tls_certfile: str = ""
    tls_keyfile: str = ""


class Hl7Settings(BaseModel):
    """HL7 v2 over MLLP: orders in from the RIS (a listener) and AI results out to the RIS (through the outbox)."""

    # The order listener: port 0 runs none (`triage serve --hl7-port`, TRIAGE_HL7__PORT).
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    # Where ORU^R01 results and priority notices go; an empty host sends none (TRIAGE_HL7__RIS_HOST, __RIS_PORT).
    ris_host: str = ""
    ris_port: int = Field(default=2575, ge=1, le=65535)
    sending_application: str = "TRIAGE"
    sending_facility: str = "TRIAGE"
    receiving_application: str = "RIS"
    receiving_facility: str = ""
    timeout_s: float = Field(default=30.0, gt=0)
    # MLLP inside TLS: the listener's certificate and key (both set: TLS on; `client_ca` also set: the RIS must
    # present a certificate that CA signed), and for results sent to the RIS whether to use TLS and which CA to
    # trust (empty: the system's) with an optional client certificate and key.
    certfile: str = ""
    keyfile: str = ""
    client_ca: str = ""
    ris_tls: bool = False
    ris_ca: str = ""
    ris_certfile: str = ""
    ris_keyfile: str = ""


class AlertSettings(BaseModel):
    """Critical alerts: who is told when an AI finding makes a study stat (sites may name their own contacts).

    Webhooks get a JSON body signed with HMAC-SHA256 of `webhook_secret` (header X-Triage-Signature:
    sha256=<hex>); e-mail goes through `smtp_host`. If no radiologist claims the study within
    `escalate_after_min`, the escalation contacts are told. Alerts carry no patient name or ID.
    """

    webhooks: list[str] = Field(default_factory=list)
    emails: list[str] = Field(default_factory=list)
    escalation_webhooks: list[str] = Field(default_factory=list)
    escalation_emails: list[str] = Field(default_factory=list)
    escalate_after_min: float = Field(default=15.0, gt=0)
    webhook_secret: str = ""
    smtp_host: str = ""
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_from: str = "triage@localhost"
    smtp_starttls: bool = False
    # Implicit TLS from the first byte (SMTPS, usually port 465) in place of STARTTLS.
    smtp_ssl: bool = False
    # The CA bundle the mail server's certificate is checked against (empty: the system's CAs).
    smtp_tls_ca: str = ""
    smtp_user: str = ""
    smtp_password: str = ""
    timeout_s: float = Field(default=15.0, gt=0)
    # The study page's address in alerts: "{base_url}/studies/{study_uid}" (empty: no link).
    base_url: str = ""

    @model_validator(mode="after")
    def _no_password_in_clear(self) -> AlertSettings:
        if self.smtp_user and not (self.smtp_starttls or self.smtp_ssl):
            raise ValueError(
                "alerts.smtp_user is set but the connection to the mail server is not encrypted: set"
                " TRIAGE_ALERTS__SMTP_STARTTLS=true (or __SMTP_SSL=true for SMTPS) so the password never travels in"
                " clear"
            )
        if self.smtp_starttls and self.smtp_ssl:
            raise ValueError("alerts.smtp_starttls and alerts.smtp_ssl exclude each other: choose one")
        return self


class OutboxSettings(BaseModel):
    """Delivery of what triage sends out (HL7, webhooks, e-mail): how often it looks, and the retry backoff."""

    interval_s: float = Field(default=2.0, gt=0)
    retry_base_s: float = Field(default=5.0, gt=0)
    retry_max_s: float = Field(default=600.0, gt=0)
    # A message still failing transiently this long after it was written is kept as failed, for an admin.
    give_up_after_h: float = Field(default=72.0, gt=0)
    # A claimed message is due again after this long (a worker that died while sending): above every channel's
    # own timeout.
    lease_s: float = Field(default=300.0, gt=0)


class HttpSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    # HTTPS for the API and pages (both set): TLS 1.2+ with BCP 195 suites, HSTS sent, cookies marked Secure.
    certfile: str = ""
    keyfile: str = ""
    hsts_max_age_s: int = Field(default=31_536_000, ge=0)


class DicomWebSettings(BaseModel):
    """The DICOMweb boundary (STOW-RS, PS3.18 10.5)."""

    # Largest STOW-RS request body accepted; larger ones are answered 413 before (Content-Length) or while
    # (chunked) they are read. 2 GiB fits a large CT or tomosynthesis study; senders may split bigger ones.
    stow_max_body_bytes: int = Field(default=2 * 1024**3, gt=0)
    # A request body is spooled to a temporary file under data_dir once it exceeds this, so memory stays
    # bounded by about one instance rather than the whole request.
    stow_spool_memory_bytes: int = Field(default=8 * 1024**2, ge=0)


class DeploymentSettings(BaseModel):
    """How one model version is served by Ray Serve: replicas, autoscaling, back-pressure and batching.

    With min_replicas == max_replicas the deployment keeps that many replicas; otherwise Serve's autoscaler keeps
    between the two, aiming at `target_ongoing_requests` per replica.
    """

    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    # Requests a replica takes at once (back-pressure: the rest wait in the caller's queue).
    max_ongoing_requests: int = Field(default=4, ge=1)
    # Dynamic batching inside a replica: items (radiographs, CT tiles, from one study or several) run together,
    # up to this many, waiting at most batch_wait_timeout_s for a batch to fill.
    max_batch_size: int = Field(default=4, ge=1)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)


class RaySettings(BaseModel):
    """Where the pipeline runs. Empty address: start a local Ray instance."""

    address: str = ""
    num_cpus: int | None = None
    # Fraction of a GPU each model replica asks for when the cluster has GPUs.
    gpus_per_inference_worker: float = 1.0
    # CPUs a model replica reserves for its whole life, and what each preprocessing or post-processing task asks
    # for. A quarter and a half let a 1-CPU node hold two replicas and still run a task beside them, and keep both
    # off a head node started with no CPUs; the ONNX and MONAI threads use whatever cores the node has.
    cpus_per_inference_worker: float = 0.25
    cpus_per_task: float = 0.5
    # Custom Ray resources (node labels, e.g. {"inference": 1}) that replicas and tasks must find on a node.
    inference_resources: dict[str, float] = Field(default_factory=dict)
    task_resources: dict[str, float] = Field(default_factory=dict)
    # Every model version's deployment, and per-model overrides by model name (JSON in the environment:
    # TRIAGE_RAY__DEPLOYMENTS='{"ct-head-ich": {"max_replicas": 2}}').
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings)
    deployments: dict[str, DeploymentSettings] = Field(default_factory=dict)
    # Serve's health check of each replica; a replica failing it (or dead) is replaced by Serve.
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    # A model whose deployment failed (its replicas cannot load it) is deployed again after this long,
    # doubling up to 5 minutes.
    worker_replace_backoff_s: float = 10.0

    def deployment_for(self, model: str) -> DeploymentSettings:
        """The deployment settings of `model`: its override merged over the common ones."""
        override = self.deployments.get(model)
        if override is None:
            return self.deployment
        return self.deployment.model_copy(update=override.model_dump(exclude_unset=True))


class InferenceSettings(BaseModel):
    """ONNX Runtime execution: providers in order of preference, threads, ensemble size."""

    # Tried in order; the ones not available in the installed onnxruntime are skipped.
    providers: list[str] = Field(
        default_factory=lambda: [
            "TensorrtExecutionProvider",
            "CUDAExecutionProvider",
            "OpenVINOExecutionProvider",
            "CPUExecutionProvider",
        ]
    )
    intra_op_threads: int = 0  # 0: onnxruntime's default (one per core)
    # Run in fp16 on TensorRT where the model's card allows it (and its parity check against fp32 holds).
    fp16: bool = True
    # Run in bf16 on OpenVINO where the CPU has bf16 units (AMX, AVX512-BF16) and the card allows it (and its
    # parity check against fp32 holds); elsewhere OpenVINO runs in fp32.
    bf16: bool = True
    # TensorRT keeps the engines it builds here (building one takes minutes); empty: not kept.
    trt_cache_dir: str = ""
    # How many ensemble members of a multi-member model run; 0 means the card's default for the device.
    ensemble_members: int = 0
    # Deadline for each pipeline stage of one series on Ray; past it the stage is stopped (a task stops itself,
    # keeping its warm worker; an inference request is cancelled on its replica) and the attempt counts as a
    # transient failure. A task's deadline counts its run, not its wait for a worker to start.
    timeout_s: float = 1800.0
    # A transient failure (worker or node died, out of memory, deadline, lost object) is retried: at most this
    # many attempts per study, the n-th retry waiting retry_backoff_s * 3**(n-1) seconds.
    max_attempts: int = 3
    retry_backoff_s: float = 10.0
    # How often each model's deployment is checked (and a failed one deployed again); a probe of its replicas
    # waits at most probe_timeout_s.
    health_interval_s: float = 10.0
    probe_timeout_s: float = 30.0
    # Studies that failed for a transient reason are re-queued when their model is healthy again, at most this
    # many times each (an admin can always re-queue a study).
    max_auto_requeues: int = 3


class AnalysisSettings(BaseModel):
    """The analysis scheduler: how many studies it analyses at once and how long its claim on one lasts."""

    # Studies analysed at the same time by one scheduler process; size it to the cluster behind it.
    concurrency: int = Field(default=2, ge=1)
    # A claimed study is re-queued by any scheduler when its claimant stops renewing the claim for this long
    # (the process died); renewed every lease_s / 3.
    lease_s: float = Field(default=60.0, gt=0)


class PrioritySettings(BaseModel):
    """The site's priority policy: finding -> level, and turnaround targets per clinical level."""

    finding_levels: dict[str, str] = Field(
        default_factory=lambda: {"intracranial_haemorrhage": "stat", "pneumothorax": "stat"}
    )
    turnaround_min: dict[str, float] = Field(default_factory=lambda: {"stat": 60.0, "urgent": 240.0, "routine": 1440.0})
    # A study is promoted one level once this fraction of its turnaround target has elapsed.
    promote_at_fraction: float = 0.75
    # Quick reads (studies whose every modality is one of these: radiographs) are ordered as if they had waited
    # this many minutes longer than they have, among studies without the stat head start: a study that takes a
    # minute to read no longer queues behind studies that take ten. 0 turns it off. Tuned with `triage simulate`
    # (README: "Tuning the default policy").
    quick_read_head_start_min: float = Field(default=15.0, ge=0)
    quick_read_modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])


class ReadingSettings(BaseModel):
    """Who sees which studies, and how long a claim may sit idle (sites set their own limit)."""

    # Whether radiologists see studies from senders no registered site claims. Unset (the default): yes while no
    # site is registered (the embedded default hides nothing), no once any is, so that a radiologist reads only
    # for the hospitals they hold a privilege for; admins always see every study and can register the sender.
    unregistered_visible: bool | None = None
    # A claim nobody acted on for this long is released (studies of unregistered senders; sites set their own).
    claim_idle_min: float = Field(default=30.0, gt=0)
    # How often idle claims are looked for.
    idle_check_s: float = Field(default=60.0, gt=0)


class ValidationThresholds(BaseModel):
    """What a site asks of a local validation report before a model may raise priority there.

    Sensitivity and specificity are checked on the lower bound of their 95% bootstrap interval, not the point
    estimate, so a small validation set cannot pass on luck.
    """

    min_cases: int = Field(default=100, ge=1)
    min_positives: int = Field(default=20, ge=1)
    min_negatives: int = Field(default=20, ge=1)
    min_sensitivity_lower_ci: float = Field(default=0.80, ge=0, le=1)
    min_specificity_lower_ci: float = Field(default=0.80, ge=0, le=1)
    min_auc: float = Field(default=0.85, ge=0, le=1)


class ModelSettings(BaseModel):
    """What a model must show before its flags may raise priority at a site (see triage.models.states).

    Models trained on synthetic data, cards that declare no validation and new versions always start in shadow.
    With `require_local_validation` a model whose card declares only an external (published) validation starts
    in shadow too, so that nothing raises priority at a site before a local validation report for that site was
    accepted (`triage models promote`): set it for clinical use. Off by default so that the embedded default
    triages head CTs with its externally validated model out of the box.
    """

    require_local_validation: bool = False
    # What a local validation report must show, for every site ...
    validation: ValidationThresholds = Field(default_factory=ValidationThresholds)
    # ... unless the site sets its own: {"<institution>": {"min_cases": 200, ...}}.
    site_thresholds: dict[str, ValidationThresholds] = Field(default_factory=dict)
    # Drift watch (triage.worklist.monitoring): every drift_interval_s the analysis role compares each model's last
    # drift_window_h hours per site with the drift_baseline_days before them (or with its validation report's
    # expected flag rate); windows with fewer than drift_min_studies studies are not judged.
    drift_interval_s: float = Field(default=3600.0, gt=0)
    drift_window_h: float = Field(default=24.0, gt=0)
    drift_baseline_days: float = Field(default=28.0, gt=0)
    drift_min_studies: int = Field(default=20, ge=1)


class Settings(BaseSettings):
    """All settings. Build once at the edge (CLI, app factory) and pass down."""

    model_config = SettingsConfigDict(env_prefix="TRIAGE_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = Path("./var")
    database_url: str = ""  # empty: SQLite file under data_dir
    weights_dir: Path = REPO_ROOT / "weights"
    routing_rules: Path = REPO_ROOT / "triage" / "pipelines" / "routing.yaml"
    # Secret salt for hashing patient IDs in the database and logs. Empty: a random one is created on first
    # start and kept in <data_dir>/phi_salt (readable by the service user only).
    phi_salt: str = ""
    log_json: bool = False
    log_level: str = "INFO"
    # Password of the first admin, created at first start; empty: generated and printed once on stderr.
    admin_password: str = ""
    # "Open in viewer" on the study page: a URL with {study_uid} (and {accession}) filled in, for example an OHIF
    # viewer on triage's DICOMweb ("https://ohif.example.org/viewer?StudyInstanceUIDs={study_uid}") or on the site's
    # PACS. Empty: no link.
    viewer_url_template: str = ""
    # Sign-in sessions expire after this many hours.
    session_ttl_h: float = 12.0
    # Whether a service account (API token) may mark a study reported, as a RIS bridge does when the report is
    # signed in the RIS (TRIAGE_RIS_BRIDGE_MAY_REPORT). Off by default: a machine account that can mark reported
    # can hide studies from the default worklist. Claims are for people whatever this says.
    ris_bridge_may_report: bool = False

    dicom: DicomSettings = Field(default_factory=DicomSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    dicomweb: DicomWebSettings = Field(default_factory=DicomWebSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings)
    priority: PrioritySettings = Field(default_factory=PrioritySettings)
    reading: ReadingSettings = Field(default_factory=ReadingSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    results: ResultsSettings = Field(default_factory=ResultsSettings)
    hl7: Hl7Settings = Field(default_factory=Hl7Settings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "dicom"

    @property
    def overlay_dir(self) -> Path:
        return self.data_dir / "overlays"

    def ensure_phi_salt(self) -> str:
        """The salt in use: the setting, else the one kept under the data dir (created once, mode 0600)."""
        if not self.phi_salt:
            path = self.data_dir / "phi_salt"
            if not path.exists():
                import secrets

                self.data_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as handle:
                    handle.write(secrets.token_hex(32))
            self.phi_salt = path.read_text().strip()
        return self.phi_salt

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'triage.db').resolve()}"
