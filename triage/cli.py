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
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from triage.config import REPO_ROOT, Settings
from triage.logs import configure_logging

app = typer.Typer(help="AI triage for teleradiology worklists.", no_args_is_help=True, add_completion=False)
models_app = typer.Typer(help="Installed models: list, validate, export, evaluate, benchmark.", no_args_is_help=True)
synth_app = typer.Typer(help="Generate synthetic data (demonstration and tests).", no_args_is_help=True)
users_app = typer.Typer(help="Users, roles and API tokens (same --data-dir as serve).", no_args_is_help=True)
app.add_typer(users_app, name="users")
app.add_typer(models_app, name="models")
app.add_typer(synth_app, name="synth")
console = Console()
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


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


# ----------------------------------------------------------------------------------------------- serve
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
) -> None:
    """Run the service: DICOM listener, DICOMweb and HTTP API, study watcher, and the Ray pipeline."""
    import uvicorn

    from triage.serve.app import create_app

    settings = _settings(data_dir, port=dicom_port, ae_title=ae_title, stable_age_s=stable_age_s)
    if http_port is not None:
        settings.http.port = http_port
    if host is not None:
        settings.http.host = host
    if ray_address is not None:
        settings.ray.address = ray_address
    configure_logging(settings.log_level, settings.log_json)
    err.print(
        f"triage: HTTP http://{settings.http.host}:{settings.http.port}  DICOM {settings.dicom.ae_title}@"
        f"{settings.dicom.port}  data {settings.data_dir.resolve()}  runner {runner}"
    )
    uvicorn.run(
        create_app(settings, runner_kind=runner), host=settings.http.host, port=settings.http.port, log_level="warning"
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

    files = collect_files(paths)
    if not files:
        _fail(f"no DICOM files found under {[str(p) for p in paths]}")
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
        raise typer.Exit(1)


# ----------------------------------------------------------------------------------------------- infer
def infer_path(path: Path, settings: Settings, model: str | None = None) -> dict[str, Any]:
    """Run routing and the pipeline in-process on a local study folder; returns a JSON-ready report."""
    import pydicom

    from triage.dicom.sender import collect_files
    from triage.dicom.series import group_series
    from triage.dicom.store import extract_meta
    from triage.models.registry import ModelRegistry
    from triage.pipelines.routing import RoutingRules, route_study
    from triage.pipelines.runner import InProcessRunner

    files = collect_files([path])
    if not files:
        raise typer.BadParameter(f"no DICOM files under {path}")
    metas = [extract_meta(pydicom.dcmread(f, stop_before_pixels=True), str(f), "", settings.phi_salt) for f in files]
    registry = ModelRegistry(settings.weights_dir)
    studies: dict[str, list[Any]] = {}
    for meta in metas:
        studies.setdefault(meta.study_uid, []).append(meta)
    runner = InProcessRunner(registry, settings.inference)
    report: dict[str, Any] = {"studies": []}
    for study_uid, study_metas in studies.items():
        series_list = group_series(study_metas)
        decisions = route_study(series_list, RoutingRules.load(settings.routing_rules), set(registry.names()))
        if model is not None:
            decisions = [d for d in decisions if d.model == model]
        by_uid = {s.series_uid: s for s in series_list}
        work = [(by_uid[d.series_uid], d) for d in decisions if d.model]
        results = runner.analyse(study_uid, work)
        report["studies"].append(
            {
                "study_uid": study_uid,
                "routing": [{"series_uid": d.series_uid, "model": d.model, "reason": d.reason} for d in decisions],
                "results": [
                    {
                        "series_uid": r.series_uid,
                        "model": r.model,
                        "model_version": r.model_version,
                        "ok": r.ok,
                        "error": r.error,
                        "timings_s": {k: round(v, 3) for k, v in r.timings.seconds.items()},
                        "findings": [
                            {**f.to_dict(), **({"notice": SYNTHETIC_NOTICE} if f.synthetic else {})} for f in r.findings
                        ],
                    }
                    for r in results
                ],
            }
        )
    return report


@app.command()
def infer(
    path: Annotated[Path, typer.Argument(help="A study folder or DICOM file")],
    model: Annotated[str | None, typer.Option(help="Only run this model")] = None,
    members: Annotated[int, typer.Option(help="Ensemble members to run (0: the card's default)")] = 0,
) -> None:
    """Run the pipeline on a local study without a server and print the findings as JSON (with stage timings)."""
    settings = Settings()
    if members:
        settings.inference.ensemble_members = members
    configure_logging("WARNING")
    with err.status(f"analysing {path} ..."):
        report = infer_path(path, settings, model)
    console.print_json(json.dumps(report))


# ----------------------------------------------------------------------------------------------- worklist
def fetch_worklist(url: str, token: str | None) -> list[dict[str, Any]]:
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(
        f"{url.rstrip('/')}/api/v1/worklist", params={"include_reported": True}, headers=headers, timeout=30
    )
    if response.status_code == 401:
        _fail(
            "the server wants an API token: pass --token or set TRIAGE_API_TOKEN (triage users add NAME --role service)"
        )
    response.raise_for_status()
    items: list[dict[str, Any]] = response.json()
    return items


def _finding_text(f: dict[str, Any]) -> str:
    flag = "[bold red]FLAG[/bold red] " if f.get("flagged") else ""
    details = f.get("details") or {}
    extra = []
    if "subtype" in details and f.get("flagged"):
        extra.append(str(details["subtype"]))
    if details.get("volume_ml") is not None:
        extra.append(f"{details['volume_ml']:.1f} mL")
    text = f"{flag}{f['label']} p={f['probability']:.2f} ({f['model']} {f['model_version']}"
    text += (", " + ", ".join(extra) if extra else "") + ")"
    if f.get("synthetic"):
        text += f" [yellow][{SYNTHETIC_NOTICE}][/yellow]"
    return text


def render_worklist(items: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, show_lines=True, expand=True)
    for column in ("#", "priority", "why", "study", "AI", "findings", "waiting"):
        table.add_column(column, overflow="fold")
    for rank, item in enumerate(items, 1):
        priority = item["priority"]
        level = priority["level"]
        style = {"stat": "bold red", "urgent": "yellow"}.get(level, "")
        table.add_row(
            str(rank),
            f"[{style}]{level}[/{style}]" if style else level,
            "\n".join(r["text"] for r in priority["reasons"]),
            f"{item['modality']} {item.get('study_description') or ''}\n{item['study_uid'][-16:]}",
            item["ai_status"] + (f"\n{item['ai_reason']}" if item.get("ai_reason") else ""),
            "\n".join(_finding_text(f) for f in item["findings"]) or "-",
            f"{item.get('waiting_min', 0):.0f} min",
        )
    return table


@app.command()
def worklist(
    url: Annotated[str, typer.Option(help="A running triage server")] = "http://127.0.0.1:8000",
    token: Annotated[str | None, typer.Option(envvar="TRIAGE_API_TOKEN", help="API token of a service account")] = None,
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


@app.command()
def demo(
    data_dir: Annotated[Path, typer.Option(help="Fresh data directory for the demo (emptied first)")] = Path(
        "var/demo"
    ),
    ct: Annotated[Path, typer.Option(help="Head CT folder to send")] = DEMO_CT,
    n_xrays: Annotated[int, typer.Option(help="Synthetic chest X-rays to generate and send")] = 3,
    timeout_s: Annotated[float, typer.Option(help="Give up waiting for the analyses after this long")] = 900,
) -> None:
    """Start the service on the embedded defaults, send the head CT and synthetic chest X-rays with dcmtk's
    storescu, and print the worklist before and after analysis."""
    from rich.progress import Progress

    from triage.dicom.dcmtk import DCMTK_ENV, find_dcmtk
    from triage.training.synth_xray import generate_dataset

    storescu = find_dcmtk("storescu")
    if storescu is None:
        _fail("dcmtk's storescu is not installed (Debian/Ubuntu: apt-get install dcmtk)")
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    from triage.worklist.accounts import add_user

    settings = _settings(data_dir)
    _, token = add_user(settings, "demo", "service")
    xray_dir = Path(tempfile.mkdtemp(prefix="triage-demo-xr-"))
    generate_dataset(xray_dir, n=n_xrays, positive_fraction=0.67, seed=7, fmt="dicom")
    http_port, dicom_port = _free_port(), _free_port()
    url = f"http://127.0.0.1:{http_port}"
    env = {**os.environ, "TRIAGE_DICOM__STABLE_AGE_S": os.environ.get("TRIAGE_DICOM__STABLE_AGE_S", "5")}
    command = [
        sys.executable,
        "-m",
        "triage",
        "serve",
        "--http-port",
        str(http_port),
        "--dicom-port",
        str(dicom_port),
        "--data-dir",
        str(data_dir),
    ]
    log_path = data_dir / "server.log"
    err.print(f"starting the service (log: {log_path}) ...")
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        with err.status("waiting for the service (Ray, models) ..."):
            _wait_ready(url, proc, 300)
        for folder, label in ((ct, "head CT"), (xray_dir, "chest X-rays")):
            err.print(f"storescu: sending the {label} from {folder}")
            subprocess.run(
                [storescu, "-aec", "TRIAGE", "+sd", "+r", "127.0.0.1", str(dicom_port), str(folder)],
                check=True,
                env={**os.environ, **DCMTK_ENV},
            )
        time.sleep(1)
        console.print(render_worklist(fetch_worklist(url, token), "worklist just after the studies arrived"))
        expected = 1 + n_xrays
        with Progress(console=err) as progress:
            task = progress.add_task("analysing", total=expected)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                items = fetch_worklist(url, token)
                done = sum(1 for i in items if i["ai_status"] not in ("pending", "analysing"))
                progress.update(task, completed=done)
                if len(items) >= expected and done >= expected:
                    break
                time.sleep(2)
        console.print(render_worklist(fetch_worklist(url, token), "worklist after analysis"))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(xray_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- models
@models_app.command("list")
def models_list(weights_dir: Annotated[Path | None, typer.Option()] = None) -> None:
    """Installed models: name, version, task, licence, synthetic or not, and whether the sha256 matches."""
    from triage.errors import ModelLoadError
    from triage.models.registry import ModelRegistry

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
