"""The `triage` command: every command is a thin call into the layers below."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from triage.config import REPO_ROOT, Settings
from triage.domain import Finding, utcnow
from triage.errors import TriageError
from triage.logs import configure_logging

if TYPE_CHECKING:
    from triage.worklist.repository import WorklistItem

DEBUG_KEY = "triage.debug"
DEFAULT_URL = "http://127.0.0.1:8000"
TOKEN_HINT = "create one with `triage users add NAME --role service --data-dir DIR` (DIR: the server's --data-dir)"


def describe_error(exc: BaseException) -> str:
    """One line for a person at a terminal: what went wrong and, where we know it, how to fix it."""
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        response = exc.response
        try:
            detail = response.json().get("detail", "")
        except ValueError:
            detail = response.text[:200]
        return f"the triage server answered {response.status_code} to {exc.request.method} {exc.request.url.path}" + (
            f": {detail}" if detail else ""
        )
    if isinstance(exc, httpx.TransportError):
        url = exc.request.url
        server = f"{url.scheme}://{url.netloc.decode()}"
        if isinstance(exc, httpx.TimeoutException):
            why = "no answer in time"
        elif isinstance(exc, httpx.ConnectError):
            text = str(exc)
            why = "connection refused" if "refused" in text.lower() else text or "cannot connect"
        else:
            why = str(exc) or type(exc).__name__
        return f"cannot reach the triage server at {server} ({why}); start it with `triage serve` or pass --url"
    if isinstance(exc, httpx.HTTPError):
        return f"HTTP request failed: {exc}"
    if isinstance(exc, FileNotFoundError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}; check the path"
    if isinstance(exc, PermissionError):
        return f"{exc.filename or ''}: permission denied; check the file's owner and mode"
    if isinstance(exc, TriageError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return f"unexpected error: {type(exc).__name__}: {exc} (run `triage --debug ...` for the traceback)"


class TriageCommands(TyperGroup):
    """The root command: errors end as one line on stderr and exit status 1, not a traceback.

    Usage errors keep click's exit status 2. `triage --debug ...` or TRIAGE_LOG_LEVEL=DEBUG shows the traceback.
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            # Typer's own signals (exit, abort, usage errors) are handled by typer as usual.
            if type(exc).__module__.split(".")[0] in ("typer", "click"):
                raise
            debug = ctx.meta.get(DEBUG_KEY) or os.environ.get("TRIAGE_LOG_LEVEL", "").upper() == "DEBUG"
            if debug:
                raise
            say_error(describe_error(exc))
            raise typer.Exit(1) from None


def say_error(message: str) -> None:
    """Print `triage: MESSAGE` as one line on stderr (no wrapping, no markup)."""
    print(f"triage: {' '.join(message.split())}", file=sys.stderr, flush=True)


app = typer.Typer(
    cls=TriageCommands, help="AI triage for teleradiology worklists.", no_args_is_help=True, add_completion=False
)
models_app = typer.Typer(help="Installed models: list, validate, export, evaluate, benchmark.", no_args_is_help=True)
synth_app = typer.Typer(help="Generate synthetic data (demonstration and tests).", no_args_is_help=True)
users_app = typer.Typer(help="Users, roles and API tokens (same --data-dir as serve).", no_args_is_help=True)
app.add_typer(users_app, name="users")
app.add_typer(models_app, name="models")
app.add_typer(synth_app, name="synth")
sites_app = typer.Typer(
    help="Client hospitals (sites): how their studies are recognised, their contract and rules (same --data-dir"
    " as serve).",
    no_args_is_help=True,
)
app.add_typer(sites_app, name="sites")
# Tables stay readable when the output is a pipe or a CI log (rich falls back to 80 columns there).
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

SYNTHETIC_NOTICE = "synthetic demonstration model, not validated"
DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Where studies, the database and overlays live")]


def _settings(data_dir: Path | None = None, **dicom: Any) -> Settings:
    settings = Settings()
    if data_dir is not None:
        settings.data_dir = data_dir
    for key, value in dicom.items():
        if value is not None:
            setattr(settings.dicom, key, value)
    return settings


def _fail(message: str, code: int = 1) -> NoReturn:
    say_error(message)
    raise typer.Exit(code)


def _require_paths(paths: list[Path], what: str = "a DICOM file, a folder of them or a DICOMDIR") -> None:
    """Exit with status 2 (a usage error) naming the first path that does not exist."""
    for path in paths:
        if not path.exists():
            _fail(f"{path} does not exist; give {what}", code=2)


@app.callback()
def root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback when a command fails")] = False,
) -> None:
    """AI triage for teleradiology worklists."""
    ctx.meta[DEBUG_KEY] = debug


# ----------------------------------------------------------------------------------------------- serve
def _check_port_free(host: str, port: int, what: str, option: str) -> None:
    """Exit with one line when something already listens on (host, port), before the service starts."""
    bind_host = "" if host in ("0.0.0.0", "::") else host
    with socket.socket(socket.AF_INET6 if ":" in bind_host else socket.AF_INET) as sock:
        # As the servers do: a port left in TIME_WAIT by a stopped server is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind_host, port))
        except OSError as exc:
            _fail(f"the {what} port {port} on {host or 'all addresses'} is not free ({exc.strerror});"
                  f" stop what uses it (another `triage serve`?) or pass {option}")  # fmt: skip


@app.command()
def serve(
    http_port: Annotated[int | None, typer.Option(help="HTTP port (default 8000)")] = None,
    dicom_port: Annotated[int | None, typer.Option(help="DICOM port (default 11112)")] = None,
    data_dir: DataDir = None,
    host: Annotated[str | None, typer.Option(help="HTTP bind address (default 127.0.0.1)")] = None,
    ae_title: Annotated[str | None, typer.Option(help="Our AE title (default TRIAGE)")] = None,
    stable_age_s: Annotated[
        float | None, typer.Option(help="Seconds without a new instance before a study is complete")
    ] = None,
    runner: Annotated[str, typer.Option(help="ray (default) or inprocess (for debugging only)")] = "ray",
    ray_address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster instead of starting a local one")
    ] = None,
    hl7_port: Annotated[
        int | None, typer.Option(help="Listen for HL7 orders (MLLP) on this port (default: none; TRIAGE_HL7__PORT)")
    ] = None,
    role: Annotated[
        list[str] | None,
        typer.Option(
            "--role",
            help="api (HTTP API and pages), ingest (DICOM listener and STOW-RS) or analysis (scheduler and Ray "
            "pipeline); repeat for several; none: all three",
        ),
    ] = None,
) -> None:
    """Run the service: DICOM listener, DICOMweb and HTTP API, study watcher, and the Ray pipeline.

    Each role can run on its own, any number of times, against one PostgreSQL database
    (TRIAGE_DATABASE_URL) and one store (--data-dir); every process answers /healthz and /readyz on its HTTP
    port."""
    import uvicorn

    from triage.config import ServiceRole
    from triage.serve.app import create_app

    try:
        roles = ServiceRole.parse_all(role or [])
    except ValueError as exc:
        _fail(str(exc), code=2)
    settings = _settings(data_dir, port=dicom_port, ae_title=ae_title, stable_age_s=stable_age_s)
    if http_port is not None:
        settings.http.port = http_port
    if host is not None:
        settings.http.host = host
    if ray_address is not None:
        settings.ray.address = ray_address
    if hl7_port is not None:
        settings.hl7.port = hl7_port
    _check_port_free(settings.http.host, settings.http.port, "HTTP", "--http-port")
    if ServiceRole.INGEST in roles and settings.hl7.port:
        _check_port_free(settings.hl7.host, settings.hl7.port, "HL7", "--hl7-port")
    if ServiceRole.INGEST in roles:
        _check_port_free(settings.dicom.bind_address, settings.dicom.port, "DICOM", "--dicom-port")
    configure_logging(settings.log_level, settings.log_json)
    dicom = f"  DICOM {settings.dicom.ae_title}@{settings.dicom.port}" if ServiceRole.INGEST in roles else ""
    if ServiceRole.INGEST in roles and settings.hl7.port:
        dicom += f"  HL7 {settings.hl7.host}:{settings.hl7.port}"
    err.print(
        f"triage: roles {', '.join(sorted(roles))}  HTTP http://{settings.http.host}:{settings.http.port}{dicom}"
        f"  data {settings.data_dir.resolve()}" + (f"  runner {runner}" if ServiceRole.ANALYSIS in roles else "")
    )
    # A browser holding the live-update stream open must not keep the server from stopping.
    from triage.tls import BCP195_CIPHERS

    https: dict[str, Any] = {}
    if settings.http.certfile and settings.http.keyfile:
        https = {"ssl_certfile": settings.http.certfile, "ssl_keyfile": settings.http.keyfile,
                 "ssl_ciphers": BCP195_CIPHERS}  # fmt: skip
    uvicorn.run(
        create_app(settings, runner_kind=runner, roles=roles),
        timeout_graceful_shutdown=3,
        host=settings.http.host,
        port=settings.http.port,
        log_level="warning",
        **https,
    )


# ----------------------------------------------------------------------------------------------- ingest
@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files, folders or DICOMDIRs")],
    host: str = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The server's DICOM port")] = 11112,
    called_ae: str = "TRIAGE",
    calling_ae: str = "TRIAGE-INGEST",
) -> None:
    """Send DICOM files to a running triage server over DICOM C-STORE."""
    from rich.progress import Progress

    from triage.dicom.sender import collect_files, send_files

    _require_paths(paths)
    files = collect_files(paths)
    if not files:
        _fail(f"no DICOM files found under {', '.join(map(str, paths))}; give DICOM files or folders of them")
    with Progress(console=err) as progress:
        task = progress.add_task("sending", total=len(files))
        report = send_files(
            files,
            host,
            port,
            called_ae=called_ae,
            calling_ae=calling_ae,
            progress=lambda done, total: progress.update(task, completed=done),
        )
    console.print(f"sent {report.sent} of {len(files)} instance(s); failed {report.failed}")
    if report.failed:
        reasons = sorted({r.error or f"status 0x{r.status:04X}" for r in report.results if not r.ok and
                          (r.error or r.status is not None)})  # fmt: skip
        hint = ""
        if report.sent == 0 and any(r.startswith("cannot associate") for r in reasons):
            hint = f"; is `triage serve` listening on {host}:{port}? pass --host/--port"
        _fail(f"{report.failed} of {len(files)} instance(s) not stored: {'; '.join(reasons[:3])}{hint}")


# ----------------------------------------------------------------------------------------------- infer
def infer_path(path: Path, settings: Settings, model: str | None = None) -> dict[str, Any]:
    """Analyse a local study folder in-process, the way `triage serve` analyses a received study; returns a
    JSON-ready report.

    The files are indexed in an in-memory worklist and each study goes through `triage.analysis.analyse_study`,
    the one orchestration the scheduler uses too (routing, the runner, the fail-safe, the recorded outcome).
    Overlays are not kept. With `model`, every other installed model counts as unavailable.
    """
    import pydicom

    from triage.analysis import analyse_study
    from triage.dicom.sender import collect_files
    from triage.dicom.store import extract_meta
    from triage.models.registry import ModelRegistry
    from triage.pipelines.routing import RoutingRules
    from triage.pipelines.runner import InProcessRunner
    from triage.storage import PathSource
    from triage.worklist.model_states import ModelStates
    from triage.worklist.repository import Worklist

    files = collect_files([path])
    if not files:
        _fail(f"no DICOM files under {path}; give a study folder or a DICOM file", code=2)
    registry = ModelRegistry(settings.weights_dir)
    unavailable = set(registry.names()) - {model} if model is not None else set()
    rules = RoutingRules.load(settings.routing_rules)
    # A folder outside the store: its instances are named by their file paths, read through the same interface.
    source = PathSource()
    runner = InProcessRunner(registry, settings.inference, source)
    worklist = Worklist.open("sqlite://", settings.priority)
    # No site has set anything here: each model runs in the state its card gives it (shadow findings say so).
    states = ModelStates(worklist.engine, registry, settings.models)
    report: dict[str, Any] = {"studies": []}
    try:
        studies: dict[str, None] = {}
        for file in files:
            meta = extract_meta(pydicom.dcmread(file, stop_before_pixels=True), str(file), "", "infer")
            worklist.record_instance(meta, utcnow())
            studies.setdefault(meta.study_uid)
        for study_uid in studies:
            outcome = analyse_study(
                study_uid,
                worklist,
                registry,
                rules,
                runner,
                None,
                unavailable_models=unavailable,
                source=source,
                states=states,
            )
            report["studies"].append(
                {
                    "study_uid": study_uid,
                    "ai_status": outcome.ai_status.value,
                    "reason": outcome.reason,
                    "findings": [
                        {**f.model_dump(mode="json"), **({"notice": SYNTHETIC_NOTICE} if f.synthetic else {})}
                        for f in outcome.findings
                    ],
                    "routing": [
                        {"series_uid": d.series_uid, "model": d.model, "reason": d.reason} for d in outcome.routing
                    ],
                    "results": [
                        {
                            "series_uid": r.series_uid,
                            "model": r.model,
                            "model_version": r.model_version,
                            "ok": r.ok,
                            "error": r.error,
                            "timings_s": {k: round(v, 3) for k, v in r.timings.seconds.items()},
                            "findings": [
                                {**f.model_dump(mode="json"), **({"notice": SYNTHETIC_NOTICE} if f.synthetic else {})}
                                for f in r.findings
                            ],
                        }
                        for r in outcome.results
                        if r.model
                    ],
                }
            )
    finally:
        worklist.close()
    return report


@app.command()
def infer(
    path: Annotated[Path, typer.Argument(help="A study folder or DICOM file")],
    model: Annotated[str | None, typer.Option(help="Only run this model")] = None,
    members: Annotated[int, typer.Option(help="Ensemble members to run (0: the card's default)")] = 0,
) -> None:
    """Run the pipeline on a local study without a server and print the findings as JSON (with stage timings)."""
    _require_paths([path], "a study folder or a DICOM file")
    settings = Settings()
    if members:
        settings.inference.ensemble_members = members
    configure_logging("WARNING")
    with err.status(f"analysing {path} ..."):
        report = infer_path(path, settings, model)
    console.print_json(json.dumps(report))


# ----------------------------------------------------------------------------------------------- worklist
def fetch_worklist(url: str, token: str | None) -> list[WorklistItem]:
    """The worklist of a running server, read into the records the server lists (`GET /api/v1/worklist`)."""
    import httpx
    from pydantic import TypeAdapter

    from triage.worklist.repository import WorklistItem

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(
        f"{url.rstrip('/')}/api/v1/worklist",
        params={"include_reported": True, "limit": 10_000},  # the route pages (default 100); ask for all
        headers=headers,
        timeout=30,
    )
    if response.status_code == 401:
        if token:
            _fail(f"the server refused the API token (401): it is wrong or its account is disabled; {TOKEN_HINT}")
        _fail(f"the server wants an API token: pass --token or set TRIAGE_API_TOKEN; {TOKEN_HINT}")
    response.raise_for_status()
    return TypeAdapter(list[WorklistItem]).validate_python(response.json())


def _finding_text(f: Finding) -> str:
    flag = "[bold red]FLAG[/bold red] " if f.flagged else ""
    extra = []
    if "subtype" in f.details and f.flagged:
        extra.append(str(f.details["subtype"]))
    if f.details.get("volume_ml") is not None:
        extra.append(f"{f.details['volume_ml']:.1f} mL")
    text = f"{flag}{f.label} p={f.probability:.2f} ({f.model} {f.model_version}"
    text += (", " + ", ".join(extra) if extra else "") + ")"
    if f.synthetic:
        text += f" [yellow]{escape('[' + SYNTHETIC_NOTICE + ']')}[/yellow]"
    if f.shadow:
        text += f" [cyan]{escape('[shadow: not used for priority]')}[/cyan]"
    return text


def render_worklist(items: list[WorklistItem], title: str) -> Table:
    table = Table(title=title, show_lines=True, expand=True)
    for column in ("#", "priority", "why", "study", "AI", "findings", "waiting"):
        table.add_column(column, overflow="fold")
    for rank, item in enumerate(items, 1):
        level = item.priority.level.value
        style = {"stat": "bold red", "urgent": "yellow"}.get(level, "")
        table.add_row(
            str(rank),
            f"[{style}]{level}[/{style}]" if style else level,
            "\n".join(r.text for r in item.priority.reasons),
            f"{item.modality} {item.study_description}\n{item.study_uid[-16:]}",
            item.ai_status + (f"\n{item.ai_reason}" if item.ai_reason else ""),
            "\n".join(_finding_text(f) for f in item.findings) or "-",
            f"{item.waiting_min:.0f} min",
        )
    return table


@app.command()
def worklist(
    url: Annotated[str, typer.Option(help="A running triage server")] = DEFAULT_URL,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="TRIAGE_API_TOKEN",
            help="API token of a service account: `triage users add NAME --role service` prints one",
        ),
    ] = None,
) -> None:
    """Print the worklist of a running server, highest priority first, with the reasons for each position."""
    console.print(render_worklist(fetch_worklist(url, token), "worklist"))


# ----------------------------------------------------------------------------------------------- demo
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _fail(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    _fail(f"the server was not ready after {timeout_s:.0f} s")


DEMO_CT = REPO_ROOT / "tests" / "data" / "ct-head-ge"
# The Institution Name of the demo's generated chest X-rays: the one site where the demo activates its
# synthetic-data X-ray model (on a validation report over synthetic films of the same generator).
DEMO_SITE = "TRIAGE DEMO (synthetic)"
# A client site that has not validated the X-ray model: there it stays in shadow (flags shown badged, moving nothing).
OTHER_SITE = "CLIENT HOSPITAL (synthetic)"


def activate_for_demo_site(settings: Settings, scratch: Path, n_films: int = 120) -> list[str]:
    """Validate each installed synthetic pneumothorax model on generated films of the demo's synthetic site and
    promote it there through the same gate a real site goes through (`ModelStates.promote`).

    Returns:
        One line per model saying what was done (activated, or refused with the report's shortfalls).
    """
    from triage.models.registry import ModelRegistry
    from triage.training.evaluate import evaluate
    from triage.training.synth_xray import generate_dataset
    from triage.worklist.db import create_engine_for, migrate
    from triage.worklist.model_states import ModelStates, ValidationRefused

    registry = ModelRegistry(settings.weights_dir)
    candidates = [
        m for m in registry.all() if m.card.synthetic and any(f.label == "pneumothorax" for f in m.card.findings)
    ]
    if not candidates:
        return []
    url = settings.resolved_database_url
    migrate(url)
    states = ModelStates(create_engine_for(url), registry, settings.models)
    labels = generate_dataset(
        scratch / "validation", n=n_films, positive_fraction=0.5, seed=11, fmt="dicom", institution=DEMO_SITE
    )
    lines = []
    for model in candidates:
        report = evaluate(
            model,
            labels.parent,
            labels,
            scratch / f"validation-report-{model.card.name}",
            settings.inference.providers,
            n_bootstrap=500,
            site=DEMO_SITE,
            command="triage demo (activate_for_demo_site)",
        )
        try:
            state = states.promote(model.card.name, DEMO_SITE, report, "demo", utcnow(), version=model.card.version)
            lines.append(f"demo: {model.card.key} activated for site {DEMO_SITE!r} only: {state.reason}")
        except ValidationRefused as exc:
            lines.append(f"demo: {model.card.key} stays in shadow: {exc}")
    return lines


@app.command()
def demo(
    data_dir: Annotated[Path, typer.Option(help="Fresh data directory for the demo (emptied first)")] = Path(
        "var/demo"
    ),
    ct: Annotated[Path, typer.Option(help="Head CT folder to send")] = DEMO_CT,
    n_xrays: Annotated[int, typer.Option(help="Synthetic chest X-rays to generate and send")] = 3,
    synthetic_bleed: Annotated[
        bool, typer.Option(help="Also send a copy of the head CT with a synthetic 8 mL hyperdense insert")
    ] = True,
    keep_running: Annotated[bool, typer.Option(help="Leave the service running for the web page")] = False,
    timeout_s: Annotated[float, typer.Option(help="Give up waiting for the analyses after this long")] = 900,
) -> None:
    """Start the service on the embedded defaults, send the head CT and synthetic chest X-rays with dcmtk's
    storescu, and print the worklist before and after analysis."""
    from rich.progress import Progress

    from triage.dicom.dcmtk import DCMTK_ENV, find_dcmtk
    from triage.training.synth_xray import generate_dataset
    from triage.worklist.accounts import add_user

    storescu = find_dcmtk("storescu")
    if storescu is None:
        _fail("dcmtk's storescu is not installed (Debian/Ubuntu: apt-get install dcmtk)")
    if not any(ct.glob("*.dcm")):
        _fail(f"no head CT at {ct}")
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    _, token = add_user(_settings(data_dir), "demo", "service")
    scratch = Path(tempfile.mkdtemp(prefix="triage-demo-"))
    sends = [(ct, "the real head CT (tests/data/ct-head-ge, no known bleed)")]
    if synthetic_bleed:
        from triage.training.synth_ich import insert_haemorrhage

        bleed = insert_haemorrhage(ct, scratch / "ct-synthetic-bleed", volume_ml=8.0, seed=1)
        sends.append((bleed.out_dir, f"the same CT with a SYNTHETIC {bleed.volume_ml:.1f} mL insert (pipeline check)"))
    generate_dataset(scratch / "xr", n=n_xrays, positive_fraction=0.67, seed=7, fmt="dicom", institution=DEMO_SITE)
    sends.append((scratch / "xr", f"{n_xrays} synthetic chest X-rays from site {DEMO_SITE!r}"))
    # One more, with a pneumothorax, from a site that has not validated the model: there it runs in shadow.
    generate_dataset(scratch / "xr-other", n=1, positive_fraction=1.0, seed=3, fmt="dicom", institution=OTHER_SITE)
    sends.append((scratch / "xr-other", f"1 synthetic chest X-ray from site {OTHER_SITE!r} (model in shadow there)"))
    http_port, dicom_port = _free_port(), _free_port()
    url = f"http://127.0.0.1:{http_port}"
    env = {**os.environ, "TRIAGE_DICOM__STABLE_AGE_S": os.environ.get("TRIAGE_DICOM__STABLE_AGE_S", "5")}
    # A synthetic-data model starts in shadow everywhere: its flags move nothing. The demo validates it on films of
    # its own synthetic site and activates it there through the same gate a real site uses, so the flagged
    # X-rays move up; at every other site (the head CTs, which carry no institution) it stays in shadow.
    with err.status("validating the synthetic X-ray model on the demo site's synthetic films ..."):
        activated = activate_for_demo_site(_settings(data_dir), scratch)
    for line in activated:
        err.print(line, soft_wrap=True)
    command = [sys.executable, "-m", "triage", "serve", "--http-port", str(http_port), "--dicom-port",
               str(dicom_port), "--data-dir", str(data_dir)]  # fmt: skip
    log_path = data_dir / "server.log"
    err.print(f"starting the service on the embedded defaults (log: {log_path}) ...")
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        with err.status("waiting for the service (Ray, models) ..."):
            _wait_ready(url, proc, 300)
        for folder, label in sends:
            err.print(f"storescu -> {dicom_port}: {label}")
            subprocess.run(
                [storescu, "-aec", "TRIAGE", "+sd", "+r", "+sp", "*.dcm", "127.0.0.1", str(dicom_port), str(folder)],
                check=True,
                env={**os.environ, **DCMTK_ENV},
            )
        time.sleep(1)
        console.print(render_worklist(fetch_worklist(url, token), "worklist just after the studies arrived"))
        expected = len(sends) - 2 + n_xrays + 1
        with Progress(console=err) as progress:
            task = progress.add_task("analysing", total=expected)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                items = fetch_worklist(url, token)
                done = sum(1 for i in items if i.ai_status not in ("pending", "analysing"))
                progress.update(task, completed=done)
                if len(items) >= expected and done >= expected:
                    break
                time.sleep(2)
        console.print(render_worklist(fetch_worklist(url, token), "worklist after analysis"))
        if keep_running:
            err.print(f"web worklist: {url}/  (user admin; its password is in {log_path}); Ctrl-C stops it")
            proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(scratch, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- models
@models_app.command("list")
def models_list(weights_dir: Annotated[Path | None, typer.Option()] = None) -> None:
    """Installed models: name, version, task, licence, synthetic or not, and whether the sha256 matches."""
    from triage.errors import ModelLoadError
    from triage.models.registry import ModelRegistry

    if weights_dir is not None:
        _require_paths([weights_dir], "the folder with <model>/<version>/card.json (--weights-dir)")
    registry = ModelRegistry(weights_dir or Settings().weights_dir)
    table = Table(title=f"models in {registry.weights_dir}")
    for column in ("name", "version", "task", "licence", "data", "members", "sha256"):
        table.add_column(column)
    for model in registry.all():
        try:
            model.verify()
            check = "[green]ok[/green]"
        except ModelLoadError as exc:
            check = f"[red]MISMATCH[/red] {exc}"
        data = f"[yellow]synthetic ({SYNTHETIC_NOTICE})[/yellow]" if model.card.synthetic else "real"
        table.add_row(
            model.card.name,
            model.card.version,
            model.card.task,
            model.card.licence,
            data,
            str(len(model.card.weights)),
            check,
        )
    console.print(table)
    for problem in registry.problems:
        err.print(f"[red]problem:[/red] {problem}")


@models_app.command("validate")
def models_validate(weights_dir: Annotated[Path | None, typer.Option()] = None) -> None:
    """Load every model and check its card against the ONNX graph's inputs and outputs."""
    from triage.models.registry import ModelRegistry
    from triage.models.validate import validate_model

    if weights_dir is not None:
        _require_paths([weights_dir], "the folder with <model>/<version>/card.json (--weights-dir)")
    registry = ModelRegistry(weights_dir or Settings().weights_dir)
    failures = len(registry.problems)
    for problem in registry.problems:
        err.print(f"[red]FAIL[/red] {problem}")
    for model in registry.all():
        problems = validate_model(model)
        if problems:
            failures += 1
            for problem in problems:
                err.print(f"[red]FAIL[/red] {model.card.key}: {problem}")
        else:
            console.print(f"[green]ok[/green] {model.card.key}")
    if failures:
        raise typer.Exit(1)


@models_app.command("export")
def models_export(
    name: Annotated[str, typer.Argument(help="ct-head-ich or xr-chest-pneumothorax")],
    source: Annotated[
        Path | None, typer.Option(help="ct-head-ich: the state dicts; xr: the training run folder")
    ] = None,
    version: Annotated[str, typer.Option(help="Version to write under weights/NAME/")] = "1.0.0",
    tile: Annotated[int, typer.Option(help="ct-head-ich: the exported input tile (edge, voxels)")] = 0,
    members: Annotated[str, typer.Option(help="ct-head-ich: members to export, e.g. 1-12")] = "1-12",
) -> None:
    """Rebuild a network in torch, load its weights, export ONNX, check parity and write the card."""
    settings = Settings()
    if name == "ct-head-ich":
        from triage.models.registry import ModelRegistry
        from triage.training.export_ich import export_ich, parse_members

        if not tile:  # re-export at the tile size of the installed card
            shape = ModelRegistry(settings.weights_dir).get(name).card.inputs.tensor.shape
            tile = int(shape[-1] or 0)
        paths = export_ich(
            source or REPO_ROOT / "weights-src" / "blast-ct-v1",
            settings.weights_dir / name / version,
            tile,
            parse_members(members),
        )
        for path in paths:
            console.print(str(path))
    elif name == "xr-chest-pneumothorax":
        from triage.training.export_xray import export

        if source is None:
            _fail("--source must name a training run folder (model.pt + training.json) from `triage train`")
        console.print(str(export(source, settings.weights_dir, version)))  # type: ignore[arg-type]
    else:
        _fail(f"no exporter for {name!r}; known: ct-head-ich, xr-chest-pneumothorax")


@models_app.command("evaluate")
def models_evaluate(
    name: str,
    data: Annotated[Path, typer.Option(help="Folder the CSV's image paths are relative to")],
    labels: Annotated[Path | None, typer.Option(help="CSV with columns image,label (default DATA/labels.csv)")] = None,
    out: Annotated[Path, typer.Option(help="Report folder")] = Path("reports/evaluate"),
    version: Annotated[str | None, typer.Option()] = None,
    members: int = 0,
    bootstrap: int = 1000,
    record: Annotated[bool, typer.Option(help="Write the measured figures into the model's card")] = False,
    site: Annotated[
        str | None,
        typer.Option(
            help="The site (Institution Name) these studies come from: the report then validates the model"
            " there (`triage models promote --site`)"
        ),
    ] = None,
    prevalence: Annotated[
        float | None, typer.Option(help="The site's prevalence of the finding for PPV/NPV (default: the set's)")
    ] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Score the cases with Ray Data on a Ray cluster")] = False,
    ray_address: Annotated[
        str | None, typer.Option(help="The cluster for --ray (default: TRIAGE_RAY__ADDRESS, else a local Ray)")
    ] = None,
    ray_actors: Annotated[int, typer.Option(help="Ray Data actors for --ray (each loads the model once)")] = 1,
) -> None:
    """Run the service's pipeline on a labelled set: ROC AUC, sensitivity, specificity with 95% bootstrap CIs,
    confusion matrix and ROC curve, written to a report folder (JSON + PNG + Markdown)."""
    from triage.models.registry import ModelRegistry
    from triage.training.evaluate import evaluate

    _require_paths([data], "the folder of labelled images (--data)")
    if labels is not None:
        _require_paths([labels], "a CSV with columns image,label (--labels)")
    settings = Settings()
    model = ModelRegistry(settings.weights_dir).get(name, version)
    command = " ".join(["triage", "models", "evaluate", *sys.argv[3:]])
    batch = None
    if ray:
        from triage.training.evaluate import RayBatch

        batch = RayBatch(ray_address or settings.ray.address or None, max(1, ray_actors))
    with err.status(f"evaluating {model.card.key} on {data} ..."):
        report = evaluate(
            model,
            data,
            labels,
            out,
            settings.inference.providers,
            members,
            bootstrap,
            command=command,
            site=site,
            prevalence=prevalence,
            ray=batch,
        )
    if model.card.synthetic:
        err.print(f"[yellow]{model.card.key} is a {SYNTHETIC_NOTICE}[/yellow]")
    console.print((out / "summary.md").read_text())
    console.print(f"report: {out / 'report.html'} ({out / 'report.json'}, {out / 'summary.md'})")
    if record:
        from triage.training.evaluate import record_evaluation

        console.print(f"figures recorded in {record_evaluation(model, report)}")


def _model_states(data_dir: Path | None) -> Any:
    """The model states of the service whose data dir (or TRIAGE_DATABASE_URL) is given."""
    from triage.models.registry import ModelRegistry
    from triage.worklist.db import create_engine_for, migrate
    from triage.worklist.model_states import ModelStates

    settings = _settings(data_dir)
    url = settings.resolved_database_url
    migrate(url)
    return ModelStates(create_engine_for(url), ModelRegistry(settings.weights_dir), settings.models)


SiteOption = Annotated[
    str,
    typer.Option(help="The site: its Institution Name as studies carry it; '' for studies without one"),
]


@models_app.command("status")
def models_status(
    data_dir: DataDir = None,
    site: Annotated[list[str] | None, typer.Option(help="Only these sites (repeat); default: every known site")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: one object per model version and site")] = False,
    history: Annotated[bool, typer.Option(help="Also print every recorded change")] = False,
) -> None:
    """Each installed model's state (active, shadow, off) at each site, and why. '*' is every other site."""
    from triage.models.states import site_label

    states = _model_states(data_dir)
    rows = states.status(site)
    if as_json:
        data: dict[str, Any] = {"states": [r.to_dict() for r in rows]}
        if history:
            data["history"] = states.history()
        console.print_json(json.dumps(data))
        return
    table = Table(title="model states per site", show_lines=True)
    for column in ("model", "version", "site", "state", "why", "threshold", "since"):
        table.add_column(column, overflow="fold")
    for r in rows:
        style = {"active": "green", "shadow": "cyan", "off": "dim"}[r.state.value]
        table.add_row(
            r.model,
            r.version,
            site_label(r.site),
            f"[{style}]{r.state.value}[/{style}]",
            f"{r.reason} ({'from the card' if r.source == 'card' else 'set by ' + r.changed_by})",
            "card" if r.threshold is None else f"{r.threshold:g}",
            r.changed_at.isoformat(timespec="seconds") if r.changed_at else "-",
        )
    console.print(table)
    if history:
        for change in states.history():
            console.print(
                f"{change['at']} {change['by']}: {change['model']} {change['version']} at {site_label(change['site'])}"
                f" {change['from']} -> {change['to']} ({change['action']}: {change['reason']})"
            )


def _operator() -> str:
    """Who runs this command, for the audit log (the login name; TRIAGE_OPERATOR overrides)."""
    import getpass

    return os.environ.get("TRIAGE_OPERATOR") or f"cli:{getpass.getuser()}"


@models_app.command("labels")
def models_labels(
    name: str,
    out: Annotated[Path, typer.Option(help="The label CSV to write (image,label,...)")] = Path("labels.csv"),
    data_dir: DataDir = None,
) -> None:
    """Radiologists' feedback on NAME's findings as a label CSV for `triage train` and `triage models evaluate`
    (images are store keys: pass --data DATA_DIR/dicom to them)."""
    from triage.worklist.accounts import Accounts
    from triage.worklist.feedback import export_labels
    from triage.worklist.repository import Worklist

    settings = _settings(data_dir)
    worklist = Worklist.open(settings.resolved_database_url, settings.priority)
    try:
        text = export_labels(Accounts(worklist.engine), worklist, model=name)
    finally:
        worklist.close()
    out.write_text(text)
    rows = max(0, len(text.splitlines()) - 1)
    console.print(f"{rows} labelled image(s) from feedback on {name} -> {out}; images under {settings.store_dir}")


@models_app.command("monitor")
def models_monitor(
    data_dir: DataDir = None,
    window_h: Annotated[float | None, typer.Option(help="Recent window in hours (default: the drift setting)")] = None,
    baseline_days: Annotated[float | None, typer.Option(help="Baseline before it, in days")] = None,
    site: Annotated[str | None, typer.Option(help="Only this site")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Each model's live behaviour per site: flag rate, probabilities, agreement of shadow versions with the
    active model and with radiologists' feedback, latency, and drift alerts against the baseline or the
    validation report. Exit code 3 when a drift alert is open."""
    from triage.models.states import site_label
    from triage.worklist.monitoring import activity, drift, windows

    settings = _settings(data_dir)
    states = _model_states(data_dir)
    models = settings.models
    recent, baseline = windows(utcnow(), window_h or models.drift_window_h, baseline_days or models.drift_baseline_days)
    current = activity(states.engine, *recent, site=site)
    alerts = drift(
        current, activity(states.engine, *baseline, site=site), states.expected_flag_rates(), models.drift_min_studies
    )
    if as_json:
        window = {"recent": [t.isoformat() for t in recent], "baseline": [t.isoformat() for t in baseline]}
        data = {"window": window, "activity": [a.to_dict() for a in current], "alerts": [a.to_dict() for a in alerts]}
        console.print_json(json.dumps(data))
    else:
        table = Table(title=f"models on live traffic, {recent[0]:%Y-%m-%d %H:%M} to {recent[1]:%H:%M} UTC")
        for column in ("model", "site", "state", "studies", "flag rate", "p50", "agrees with active",
                       "agrees with readers", "inference s"):  # fmt: skip
            table.add_column(column)

        def pct(value: float | None, n: int = 0) -> str:
            return "-" if value is None else f"{value:.0%}" + (f" (n={n})" if n else "")

        for a in current:
            row = a.to_dict()
            quantiles = row["probability_quantiles"] or {}
            table.add_row(
                f"{a.model} {a.version}",
                site_label(a.site),
                "shadow" if a.shadow else "active",
                str(a.studies),
                pct(a.flag_rate),
                f"{quantiles['p50']:.2f}" if quantiles else "-",
                pct(row["agreement_with_active"], row["studies_with_active"]),
                pct(row["agreement_with_radiologists"], row["studies_with_feedback"]),
                "-" if row["inference_s_median"] is None else f"{row['inference_s_median']:.2f}",
            )
        console.print(table)
        for alert in alerts:
            console.print(f"[bold red]drift[/bold red] {escape(alert.message)}")
        if not alerts:
            console.print("no drift alert")
    if alerts:
        raise typer.Exit(3)


@models_app.command("promote")
def models_promote(
    name: str,
    site: SiteOption,
    report: Annotated[Path, typer.Option(help="report.json from `triage models evaluate --site SITE`")],
    version: Annotated[str | None, typer.Option(help="Default: the newest installed")] = None,
    threshold: Annotated[
        float | None, typer.Option(help="The operating point for this site, one of the report's; default: its own")
    ] = None,
    operating_point: Annotated[
        str | None,
        typer.Option(help="One of the report's operating points by name, e.g. 'sensitivity >= 0.95'"),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Make a model active at a site (its flags raise priority there) on a passing local validation report for
    that site. Refused, with every reason, when the report falls short of the site's thresholds. Audited."""
    from triage.worklist.model_states import ValidationRefused

    _require_paths([report], "report.json from `triage models evaluate --site SITE`")
    try:
        document = json.loads(report.read_text())
    except json.JSONDecodeError as exc:
        _fail(f"{report} is not JSON: {exc}")
    try:
        state = _model_states(data_dir).promote(
            name,
            site,
            document,
            _operator(),
            utcnow(),
            version=version,
            threshold=threshold,
            operating_point=operating_point,
        )
    except ValidationRefused as exc:
        _fail(f"refused: {exc}")
    console.print(f"{state.model} {state.version} is active at site {state.site!r}: {state.reason}")


@models_app.command("rollback")
def models_rollback(
    name: str,
    site: SiteOption,
    version: Annotated[str | None, typer.Option(help="Default: the newest installed")] = None,
    why: Annotated[str, typer.Option(help="Why, for the audit log")] = "",
    data_dir: DataDir = None,
) -> None:
    """Undo the last change of a model's state at a site (an activation goes back to shadow). Audited."""
    state = _model_states(data_dir).rollback(name, site, _operator(), utcnow(), version=version, why=why)
    console.print(f"{state.model} {state.version} is {state.state.value} at site {state.site!r}: {state.reason}")


@models_app.command("set-state")
def models_set_state(
    name: str,
    state: Annotated[str, typer.Argument(help="shadow or off (active takes `triage models promote`)")],
    site: SiteOption,
    version: Annotated[str | None, typer.Option(help="Default: the newest installed")] = None,
    why: Annotated[str, typer.Option(help="Why, for the audit log")] = "",
    data_dir: DataDir = None,
) -> None:
    """Put a model in shadow or turn it off at a site ('*': every site without its own setting). Audited."""
    result = _model_states(data_dir).set_state(name, site, state, _operator(), utcnow(), why, version=version)
    console.print(f"{result.model} {result.version} is {result.state.value} at site {result.site!r}")


@models_app.command("bench")
def models_bench(
    name: str,
    input_path: Annotated[
        Path | None, typer.Option("--input", help="A DICOM series (default: a shipped/generated one)")
    ] = None,
    repeats: int = 1,
    members: int = 0,
    torch_eager: Annotated[bool, typer.Option(help="Also time torch eager on the same network input")] = True,
) -> None:
    """Per-stage latency and throughput on this machine; ONNX Runtime providers against torch eager; threads."""
    from triage.models.registry import ModelRegistry
    from triage.training.bench import bench_model, print_report

    settings = Settings()
    model = ModelRegistry(settings.weights_dir).get(name)
    report = bench_model(
        model,
        input_path,
        repeats,
        members,
        settings.inference.providers,
        settings.inference.intra_op_threads,
        torch_eager=torch_eager,
    )
    print_report(report)


@app.command()
def train(
    name: Annotated[str, typer.Argument(help="The model to train (xr-chest-pneumothorax)")],
    data: Annotated[Path | None, typer.Option(help="Folder of DICOM or PNG images")] = None,
    labels: Annotated[Path | None, typer.Option(help="CSV with columns image,label (default DATA/labels.csv)")] = None,
    siim: Annotated[Path | None, typer.Option(help="A folder in the SIIM-ACR layout (DICOM + train-rle.csv)")] = None,
    out: Annotated[Path, typer.Option(help="Training run folder")] = Path("runs/xr-chest-pneumothorax"),
    epochs: int = 10,
    seed: int = 0,
) -> None:
    """Train a model on your own labelled data; then `triage models export NAME --source OUT` installs it."""
    if name != "xr-chest-pneumothorax":
        _fail(f"training is available for xr-chest-pneumothorax; {name!r} ships pretrained weights")
    from triage.training.train_xray import train as train_xray

    if (data is None) == (siim is None):
        _fail("give exactly one of --data (with --labels) or --siim")
    source = siim or data
    assert source is not None
    result = train_xray(
        source, labels, out, epochs, siim=siim is not None, seed=seed, progress=lambda line: err.print(line)
    )
    console.print_json(json.dumps(result, default=str))


@synth_app.command("xray")
def synth_xray(
    out: Path,
    n: Annotated[int, typer.Option(help="Number of radiographs")] = 100,
    positive_fraction: float = 0.5,
    seed: int = 0,
    fmt: Annotated[str, typer.Option("--format", help="png or dicom")] = "dicom",
    size: Annotated[int, typer.Option(help="Image edge in pixels (smallest, with --max-size)")] = 256,
    max_size: Annotated[int | None, typer.Option(help="Draw each image's size from [size, max-size]")] = None,
    siim: Annotated[bool, typer.Option(help="Write the SIIM-ACR layout instead")] = False,
) -> None:
    """Generate synthetic chest radiographs (with and without pneumothorax) and their labels."""
    from triage.training.synth_xray import generate_dataset, write_siim_layout

    if siim:
        write_siim_layout(out, n, seed, size)
    else:
        generate_dataset(out, n, positive_fraction, seed, fmt, size, max_size)  # type: ignore[arg-type]
    console.print(f"wrote {n} synthetic radiograph(s) to {out}")


@synth_app.command("ich")
def synth_ich(
    source: Annotated[Path, typer.Argument(help="A head CT folder")],
    out: Path,
    volume_ml: Annotated[float, typer.Option(min=0.1, help="Volume of the inserted region (mL)")] = 5.0,
    seed: int = 0,
) -> None:
    """Copy a head CT with a synthetic hyperdense region (55-75 HU) inserted in the parenchyma (pipeline check)."""
    from triage.training.synth_ich import insert_haemorrhage

    inserted = insert_haemorrhage(source, out, volume_ml=volume_ml, seed=seed)
    console.print(str(inserted))


@app.command()
def simulate(
    scenario: Annotated[str, typer.Option(help="A shipped scenario (default) or a scenario YAML file")] = "default",
    arrivals: Annotated[
        Path | None, typer.Option(help="Replay arrivals from a CSV: time,site,modality,clinical_priority,critical")
    ] = None,
    probabilities: Annotated[
        Path | None, typer.Option(help="Per-study model probabilities (study_id,probability); needs --arrivals")
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Nights simulated per policy")] = 20,
    first_seed: Annotated[int, typer.Option(help="Seed of the first night")] = 0,
    policy: Annotated[
        list[str] | None,
        typer.Option("--policy", help="Only this policy (repeatable): fifo, ai-levels, service, next-study"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON")] = False,
    out: Annotated[Path | None, typer.Option(help="Write report.md, summary.json and waits-cdf.png here")] = None,
    weights_dir: Annotated[Path | None, typer.Option(help="Installed models (their cards)")] = None,
) -> None:
    """Simulate a reading-centre night and compare worklist orders: FIFO, AI levels, the service's, next study."""
    from triage.training.simulate import POLICIES, format_table, load_scenario, run_simulation, write_report

    _require_paths([p for p in (arrivals, probabilities) if p is not None], "a CSV file")
    settings = Settings()
    loaded, source = load_scenario(scenario)
    result = run_simulation(
        loaded,
        source,
        settings.priority,
        weights_dir or settings.weights_dir,
        seeds=seeds,
        first_seed=first_seed,
        policies=policy or POLICIES,
        arrivals_csv=arrivals,
        probabilities_csv=probabilities,
        progress=None if as_json else err.print,
    )
    summary = result.summary()
    written = write_report(result, out) if out is not None else {}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"{loaded.name}: {seeds} nights per policy; waits to read start in minutes (mean over nights, 95% CI)")
    typer.echo(format_table(summary, with_ci=True))
    for name, check in summary["targets"].items():
        maxima = ", ".join(f"{k} x{v:.2f}" for k, v in check["max_vs_fifo"].items() if v is not None)
        typer.echo(
            f"{name} vs fifo: critical median x{check['critical_median_vs_fifo']}, routine median"
            f" x{check['routine_median_vs_fifo']}, max {maxima}; targets {'met' if check['met'] else 'not met'}"
        )
    for what, path in written.items():
        typer.echo(f"{what}: {path}")


# ----------------------------------------------------------------------------------------------- users
@users_app.command("add")
def users_add(
    name: str,
    role: Annotated[str, typer.Option(help="radiologist, admin or service")] = "radiologist",
    password: Annotated[str | None, typer.Option(help="Password for a person (generated when omitted)")] = None,
    data_dir: DataDir = None,
) -> None:
    """Add a user. For role service the new API token is printed alone on the last line."""
    from triage.worklist.accounts import add_user

    user, secret = add_user(_settings(data_dir), name, role, password)
    if user.role == "service":
        err.print(f"service account {user.name} added; its API token (use as 'Authorization: Bearer TOKEN'):")
    else:
        err.print(f"user {user.name} ({user.role}) added; password{' (generated)' if password is None else ''}:")
    print(secret)


@users_app.command("list")
def users_list(data_dir: DataDir = None) -> None:
    """List users with their role and whether they are disabled."""
    from triage.worklist.accounts import list_users

    table = Table(title="users")
    for column in ("name", "role", "disabled"):
        table.add_column(column)
    for user in list_users(_settings(data_dir)):
        table.add_row(user.name, str(user.role), "yes" if getattr(user, "disabled", False) else "no")
    console.print(table)


@users_app.command("disable")
def users_disable(name: str, data_dir: DataDir = None) -> None:
    """Disable a user: their sessions end and their API tokens stop working."""
    from triage.worklist.accounts import disable_user

    user = disable_user(_settings(data_dir), name)
    console.print(f"disabled {user.name}")


@users_app.command("grant")
def users_grant(
    name: str,
    site: Annotated[str, typer.Option(help="The site (client hospital) they may read for")],
    until: Annotated[
        str | None, typer.Option(help="Last day of the privilege, YYYY-MM-DD (inclusive); default: no expiry")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Let a radiologist read a site's studies (their licence and credentials there), until a date. Audited."""
    from datetime import date

    from triage.worklist.accounts import open_accounts

    settings = _settings(data_dir)
    user = open_accounts(settings).get_user(name)
    if user.role != "radiologist":
        _fail(f"{name!r} has role {user.role}; privileges are for radiologists (admins and services see every site)")
    day = None
    if until:
        try:
            day = date.fromisoformat(until)
        except ValueError:
            _fail(f"--until {until!r} is not a date; use YYYY-MM-DD", code=2)
    privilege = _worklist(settings).sites.grant(name, site, day, _operator(), utcnow())
    ends = f"until {privilege.until.isoformat()} (inclusive)" if privilege.until else "with no expiry"
    console.print(f"{privilege.username} may read site {privilege.site!r} {ends}")


@users_app.command("revoke")
def users_revoke(
    name: str,
    site: Annotated[str, typer.Option(help="The site to withdraw")],
    data_dir: DataDir = None,
) -> None:
    """Withdraw a radiologist's privilege for a site. Audited."""
    if not _worklist(_settings(data_dir)).sites.revoke(name, site, _operator(), utcnow()):
        _fail(f"{name!r} held no privilege for site {site!r}")
    console.print(f"{name} may no longer read site {site!r}")


@users_app.command("privileges")
def users_privileges(
    name: Annotated[str | None, typer.Argument(help="One user; default: everyone")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON for scripts")] = False,
    data_dir: DataDir = None,
) -> None:
    """Which sites each radiologist may read, until when, and whether the privilege is valid today."""
    today = utcnow().date()
    privileges = _worklist(_settings(data_dir)).sites.privileges(name)
    rows = [
        {
            "user": p.username,
            "site": p.site,
            "until": p.until.isoformat() if p.until else None,
            "valid_today": p.valid_on(today),
            "granted_by": p.granted_by,
            "granted_at": p.granted_at.isoformat(),
        }
        for p in privileges
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="privileges")
    for column in ("user", "site", "until", "valid today", "granted by"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["user"], row["site"], row["until"] or "no expiry", "yes" if row["valid_today"] else "EXPIRED",
                      row["granted_by"])  # fmt: skip
    console.print(table)


def _worklist(settings: Settings) -> Any:
    """The worklist of the service whose data dir (or TRIAGE_DATABASE_URL) is given, migrated."""
    from triage.worklist.repository import Worklist

    return Worklist.open(settings.resolved_database_url, settings.priority)


def _pairs(values: list[str] | None, what: str) -> dict[str, str] | None:
    """KEY=VALUE options into a dict (None when none were given)."""
    if not values:
        return None
    pairs: dict[str, str] = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key.strip() or not item.strip():
            _fail(f"{what} {value!r} must be KEY=VALUE", code=2)
        pairs[key.strip()] = item.strip()
    return pairs


AeOption = Annotated[list[str] | None, typer.Option("--ae", help="Calling AE title of a sender of this site (repeat)")]
InstitutionOption = Annotated[
    list[str] | None, typer.Option("--institution", help="Institution Name (0008,0080) in its images (repeat)")
]
StowOption = Annotated[
    list[str] | None, typer.Option("--stow-account", help="Service account it sends STOW-RS with (repeat)")
]
TzOption = Annotated[str | None, typer.Option("--tz", help="IANA time zone, e.g. Europe/London (default UTC)")]
TargetOption = Annotated[
    list[str] | None, typer.Option("--target", help="Turnaround target LEVEL=MINUTES, e.g. stat=30 (repeat)")
]
LevelOption = Annotated[
    list[str] | None,
    typer.Option("--finding-level", help="Level a flagged finding raises to, FINDING=LEVEL (repeat)"),
]
ModelsOption = Annotated[
    str | None, typer.Option("--models", help="Comma-separated models allowed on its studies ('all': every one)")
]


QuickReadOption = Annotated[
    float | None,
    typer.Option(help="Head start of quick reads (radiographs) in its order, minutes; 0: none"),
]


def _site_changes(
    ae: list[str] | None,
    institution: list[str] | None,
    stow_account: list[str] | None,
    tz: str | None,
    target: list[str] | None,
    finding_level: list[str] | None,
    models: str | None,
    results_ae: str | None,
    results_host: str | None,
    results_port: int | None,
    claim_idle_min: float | None,
    quick_read_min: float | None = None,
) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for key, value in (("ae_titles", ae), ("institution_names", institution), ("stow_accounts", stow_account)):
        if value is not None:
            changes[key] = value
    if tz is not None:
        changes["time_zone"] = tz
    targets = _pairs(target, "--target")
    if targets is not None:
        try:
            changes["turnaround_min"] = {k: float(v) for k, v in targets.items()}
        except ValueError:
            _fail(f"--target values must be minutes, got {target}", code=2)
    levels = _pairs(finding_level, "--finding-level")
    if levels is not None:
        changes["finding_levels"] = levels
    if models is not None:
        changes["models"] = (
            None if models.strip() in ("", "all") else [m.strip() for m in models.split(",") if m.strip()]
        )
    if results_host is not None:
        changes["results"] = None if not results_host else {
            "ae_title": results_ae or "PACS", "host": results_host, "port": results_port or 104
        }  # fmt: skip
    if claim_idle_min is not None:
        changes["claim_idle_min"] = claim_idle_min
    if quick_read_min is not None:
        changes["quick_read_head_start_min"] = quick_read_min
    return changes


def _print_site(site: Any, moved: int, rescored: int) -> None:
    console.print(
        f"site {site.name!r}: AE titles {site.ae_titles or '-'}, institutions {site.institution_names or '-'}, "
        f"STOW-RS accounts {site.stow_accounts or '-'}, time zone {site.time_zone}"
    )
    if moved or rescored:
        console.print(f"{moved} open studies recognised anew, {rescored} rescored with the site's rules")


@sites_app.command("add")
def sites_add(
    name: str,
    ae: AeOption = None,
    institution: InstitutionOption = None,
    stow_account: StowOption = None,
    tz: TzOption = None,
    target: TargetOption = None,
    finding_level: LevelOption = None,
    models: ModelsOption = None,
    results_ae: Annotated[str | None, typer.Option(help="Its PACS's AE title (results go there)")] = None,
    results_host: Annotated[str | None, typer.Option(help="Its PACS's host")] = None,
    results_port: Annotated[int | None, typer.Option(help="Its PACS's port")] = None,
    claim_idle_min: Annotated[float | None, typer.Option(help="Release a claim idle this long (minutes)")] = None,
    quick_read_min: QuickReadOption = None,
    data_dir: DataDir = None,
) -> None:
    """Register a client hospital. Rules it does not set come from the service default. Audited; its open studies
    are recognised and rescored at once."""
    from triage.worklist.sites import parse_site

    changes = _site_changes(ae, institution, stow_account, tz, target, finding_level, models, results_ae,
                            results_host, results_port, claim_idle_min, quick_read_min)  # fmt: skip
    site = parse_site({"name": name, **changes})
    moved, rescored = _worklist(_settings(data_dir)).save_site(site, _operator(), utcnow(), create=True)
    _print_site(site, moved, rescored)


@sites_app.command("set")
def sites_set(
    name: str,
    ae: AeOption = None,
    institution: InstitutionOption = None,
    stow_account: StowOption = None,
    tz: TzOption = None,
    target: TargetOption = None,
    finding_level: LevelOption = None,
    models: ModelsOption = None,
    results_ae: Annotated[str | None, typer.Option(help="Its PACS's AE title")] = None,
    results_host: Annotated[str | None, typer.Option(help="Its PACS's host ('' : results not sent)")] = None,
    results_port: Annotated[int | None, typer.Option(help="Its PACS's port")] = None,
    claim_idle_min: Annotated[float | None, typer.Option(help="Release a claim idle this long (minutes)")] = None,
    quick_read_min: QuickReadOption = None,
    data_dir: DataDir = None,
) -> None:
    """Change a site's rules (options given replace those fields; the others stay). Its open studies are rescored
    at once (AI never lowers a priority). Audited."""
    changes = _site_changes(ae, institution, stow_account, tz, target, finding_level, models, results_ae,
                            results_host, results_port, claim_idle_min, quick_read_min)  # fmt: skip
    if not changes:
        _fail("nothing to change; give at least one option (see --help)", code=2)
    site, moved, rescored = _worklist(_settings(data_dir)).update_site(name, changes, _operator(), utcnow())
    _print_site(site, moved, rescored)


@sites_app.command("list")
def sites_list(
    as_json: Annotated[bool, typer.Option("--json", help="The full records as JSON")] = False,
    data_dir: DataDir = None,
) -> None:
    """The registered sites with how their studies are recognised and their targets."""
    worklist = _worklist(_settings(data_dir))
    sites = worklist.sites.all()
    if as_json:
        print(json.dumps([s.model_dump(mode="json") for s in sites], indent=2))
        return
    table = Table(title="sites")
    for column in ("name", "recognised by", "time zone", "targets (min)", "finding levels", "models"):
        table.add_column(column)
    for site in sites:
        policy = site.policy(worklist.settings)
        recognised = [f"AE {a}" for a in site.ae_titles] + [f"inst. {i}" for i in site.institution_names]
        recognised += [f"STOW {a}" for a in site.stow_accounts]
        table.add_row(
            site.name,
            ", ".join(recognised) or "-",
            site.time_zone,
            ", ".join(f"{k} {v:g}" for k, v in policy.turnaround_min.items()),
            ", ".join(f"{k} -> {v}" for k, v in policy.finding_levels.items()),
            "all" if site.models is None else ", ".join(site.models) or "none",
        )
    console.print(table)


@sites_app.command("remove")
def sites_remove(name: str, data_dir: DataDir = None) -> None:
    """Remove a site and the privileges to read it; its open studies get the default policy. Audited."""
    moved, rescored = _worklist(_settings(data_dir)).remove_site(name, _operator(), utcnow())
    console.print(f"site {name!r} removed; {moved} open studies no longer claimed by it, {rescored} rescored")


# ----------------------------------------------------------------------------------------------- operations
@app.command()
def requeue(
    study_uids: Annotated[list[str] | None, typer.Argument(help="Study Instance UIDs to analyse again")] = None,
    all_failed: Annotated[bool, typer.Option("--all-failed", help="Every study whose analysis failed")] = False,
    data_dir: DataDir = None,
) -> None:
    """Queue studies for a fresh AI analysis (a running service picks them up); audited as this CLI user."""
    import getpass

    from triage.worklist.accounts import open_accounts
    from triage.worklist.repository import Worklist

    settings = _settings(data_dir)
    uids = list(study_uids or [])
    if not uids and not all_failed:
        _fail("name the studies to re-queue, or pass --all-failed")
    worklist = Worklist.open(settings.resolved_database_url, settings.priority)
    accounts = open_accounts(settings)
    actor = f"cli:{getpass.getuser()}"
    try:
        if all_failed:
            uids += [uid for uid in worklist.failed_studies() if uid not in uids]
        for uid in uids:
            now = utcnow()
            worklist.requeue(uid, now, user=actor)
            accounts.audit(actor, "requeue", now, uid, {"via": "cli"})
            console.print(f"re-queued {uid}")
    except TriageError as exc:
        _fail(str(exc))
    finally:
        worklist.close()
        accounts.engine.dispose()
    if not uids:
        console.print("no failed studies to re-queue")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
