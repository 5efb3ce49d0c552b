"""Benchmark `GET /api/v1/worklist` with 5,000 open studies on PostgreSQL, before and after SQL ordering.

Creates a fresh database on the PostgreSQL server (127.0.0.1:5432, trust auth; TRIAGE_BENCH_POSTGRES_URL
overrides), fills it through the repository's own write paths (record_instance, begin/finish_analysis) with
5,000 open studies in a realistic mix (clinical levels, flagged and negative findings, synthetic-model flags,
failures, ages from minutes to days), then starts real `triage serve` processes (in-process runner, no study
ever ready) and measures the route over HTTP with a service account's API token:

- new: the worklist as it is now (filter, order and page in SQL; the policy runs for the page only);
- old: the same server with `Worklist.list_worklist` replaced by the old implementation (commit aa48038: load
  every open study, run the policy on each, sort in Python), then the same page cut out of it;
- old, whole list: the old route as it shipped, which had no paging and returned every open study.

The database is dropped afterwards. A benchmark, not a test: the figures are printed, nothing is asserted.

Usage: python benchmarks/bench_worklist.py [--studies 5000] [--requests 200] [--limit 100]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from sqlalchemy import select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from triage.config import PrioritySettings, Settings  # noqa: E402
from triage.domain import AIStatus, InstanceMeta  # noqa: E402
from triage.worklist.db import create_engine_for, migrate  # noqa: E402
from triage.worklist.priority import level_of, require_utc, sort_key  # noqa: E402
from triage.worklist.repository import Worklist, WorklistItem, _modalities, _status  # noqa: E402
from triage.worklist.tables import Study  # noqa: E402

DEFAULT_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
MODE_ENV = "TRIAGE_BENCH_WORKLIST_MODE"  # read by the server process started with --serve
CT = "1.2.840.10008.5.1.4.1.1.2"
CR = "1.2.840.10008.5.1.4.1.1.1"


# ----------------------------------------------------------------------------------- the old implementation
def old_list_worklist(
    self: Worklist,
    now: datetime,
    status: str | None = None,
    modality: str | None = None,
    level: str | None = None,
    site: str | None = None,
    accession: str | None = None,
    include_reported: bool = False,
    limit: int | None = None,
    offset: int = 0,
) -> list[WorklistItem]:
    """`Worklist.list_worklist` as of commit aa48038 (load all open studies, policy per row, sort in Python).

    With mode "old" the page is cut from the sorted list (same response as the new route); with "old-full"
    `limit` and `offset` are ignored, as the old route had none.
    """
    now = require_utc(now, "now")
    query = select(Study)
    if status:
        query = query.where(Study.ai_status == _status(status).value)
    if site:
        query = query.where(Study.site == site)
    if accession:
        query = query.where(Study.accession_number == accession)
    if not include_reported:
        query = query.where(Study.reported_at.is_(None))
    wanted_modality = modality.strip().upper() if modality else None
    if wanted_modality:
        query = query.where(Study.modality.contains(wanted_modality, autoescape=True))
    wanted_level = level_of(level) if level else None
    with self._read() as session:
        studies = session.execute(query).scalars().all()
    items = []
    for study in studies:
        if wanted_modality and wanted_modality not in _modalities(study.modality):
            continue
        item = self._item(study, now)
        if wanted_level and item.priority.level is not wanted_level:
            continue
        items.append(item)
    items.sort(key=lambda it: (*sort_key(it.priority, it.received_at), it.study_uid))
    if os.environ.get(MODE_ENV) == "old-full":
        return items
    return items[offset : None if limit is None else offset + limit]


def serve(argv: list[str]) -> None:
    """Run `triage serve` in this process, with the old worklist implementation when the mode says so."""
    if os.environ.get(MODE_ENV, "new") != "new":
        Worklist.list_worklist = old_list_worklist  # type: ignore[method-assign]
    from triage.cli import app

    sys.argv = ["triage", *argv]
    app()


# ------------------------------------------------------------------------------------------------ the data
def finding(label: str, probability: float, model: str, synthetic: bool = False) -> dict[str, Any]:
    return {
        "label": label,
        "probability": probability,
        "flagged": probability >= 0.5,
        "model": model,
        "model_version": "1.0.0",
        "synthetic": synthetic,
        "details": {},
    }


def populate(url: str, n: int, seed: int = 7) -> None:
    """`n` open studies through the repository's write paths, four writers at once."""
    wl = Worklist(url, PrioritySettings(), sender_priority={"ER_CT": "stat"})
    now = datetime.now(UTC)
    rng = random.Random(seed)
    plans = []
    for i in range(n):
        ct = rng.random() < 0.5
        plans.append(
            {
                "i": i,
                "ct": ct,
                "received": now - timedelta(minutes=rng.expovariate(1 / 600)),
                "priority": rng.choices(["", "HIGH", "STAT"], weights=[80, 15, 5])[0],
                "ae": rng.choice(["CT1", "CR1", "ER_CT"]) if ct else "CR1",
                "site": rng.choice(["North", "South", "East"]),
                "outcome": rng.choices(["pending", "done", "failed"], weights=[35, 60, 5])[0],
                "p": rng.random(),
                "synthetic": rng.random() < 0.3,
            }
        )

    def write(plan: dict[str, Any]) -> None:
        study = f"2.25.{uuid.uuid4().int}"
        meta = InstanceMeta(
            study_uid=study,
            series_uid=f"{study}.1",
            sop_instance_uid=f"{study}.1.1",
            sop_class_uid=CT if plan["ct"] else CR,
            modality="CT" if plan["ct"] else "CR",
            key=f"{study}/{study}.1/{study}.1.1.dcm",
            accession_number=f"ACC{plan['i']:06d}",
            patient_hash=f"{plan['i']:012x}",
            study_description="CT HEAD" if plan["ct"] else "CHEST PA",
            institution=plan["site"],
            calling_ae=plan["ae"],
            requested_priority=plan["priority"],
        )
        wl.record_instance(meta, plan["received"])
        if plan["outcome"] == "pending":
            return
        at = plan["received"] + timedelta(seconds=40)
        gen = wl.begin_analysis(study, at, worker="bench")
        if plan["outcome"] == "failed":
            wl.finish_analysis(study, gen, [], [], AIStatus.FAILED, "model crashed", at, failure_kind="permanent")
        elif plan["ct"]:
            found = [finding("intracranial_haemorrhage", plan["p"] ** 3, "ct-head-ich")]
            wl.finish_analysis(study, gen, found, [], AIStatus.DONE, "", at)
        else:
            model = "xr-chest-pneumothorax"
            found = [finding("pneumothorax", plan["p"] ** 2, model, synthetic=plan["synthetic"])]
            wl.finish_analysis(study, gen, found, [], AIStatus.DONE, "", at)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(write, plans))
    wl.close()


# ------------------------------------------------------------------------------------------- measurements
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(mode: str, db_url: str, data_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    http_port, dicom_port = free_port(), free_port()
    env = {
        **os.environ,
        MODE_ENV: mode,
        "TRIAGE_DATABASE_URL": db_url,
        "PYTHONPATH": str(REPO),
        # No study ever becomes ready: the benchmark measures reads, not analyses.
        "TRIAGE_DICOM__STABLE_AGE_S": "1e9",
        "TRIAGE_DICOM__MAX_STUDY_WAIT_S": "1e9",
        "TRIAGE_LOG_LEVEL": "WARNING",
    }
    argv = ["serve", "--runner", "inprocess", "--http-port", str(http_port), "--dicom-port", str(dicom_port)]
    argv += ["--data-dir", str(data_dir)]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", *argv], env=env, stdout=out, stderr=out
        )
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the {mode} server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise SystemExit(f"the {mode} server did not answer within 120 s; see {log}")


def measure(base: str, token: str, requests: int, params: dict[str, Any]) -> tuple[list[float], list[str]]:
    """Latencies in ms of `requests` GETs (after 5 warm-up ones), and the UIDs of the last page."""
    headers = {"Authorization": f"Bearer {token}"}
    times: list[float] = []
    uids: list[str] = []
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        for i in range(requests + 5):
            started = time.perf_counter()
            response = client.get("/api/v1/worklist", params=params)
            elapsed = (time.perf_counter() - started) * 1000
            response.raise_for_status()
            if i >= 5:
                times.append(elapsed)
            uids = [item["study_uid"] for item in response.json()]
    return times, uids


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=5000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--full-requests", type=int, default=20, help="requests for the old whole-list route")
    parser.add_argument("--limit", type=int, default=100, help="page size (the route's default is 100)")
    args = parser.parse_args()
    logging.getLogger("triage").setLevel(logging.ERROR)  # the failed analyses written on purpose log warnings

    server = make_url(os.environ.get("TRIAGE_BENCH_POSTGRES_URL") or DEFAULT_SERVER)
    admin = create_engine_for(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
    name = f"triage_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    db_url = server.set(database=name).render_as_string(hide_password=False)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-worklist-") as tmp:
            data_dir, log = Path(tmp) / "data", Path(tmp) / "server.log"
            migrate(db_url)
            started = time.perf_counter()
            populate(db_url, args.studies)
            took = time.perf_counter() - started
            print(f"{args.studies} open studies written through the repository in {took:.0f} s")
            from triage.worklist.accounts import add_user

            settings = Settings(data_dir=data_dir, database_url=db_url)
            _, token = add_user(settings, "bench", "service")
            rows = []
            pages: dict[str, list[str]] = {}
            for mode, label, requests, params in (
                ("new", "new: order and page in SQL", args.requests, {"limit": args.limit}),
                ("old", "old: load all, sort in Python, page", args.requests, {"limit": args.limit}),
                ("old-full", "old as shipped: whole list, no paging", args.full_requests, {}),
            ):
                proc, base = start_server(mode, db_url, data_dir, log)
                procs.append(proc)
                try:
                    times, pages[mode] = measure(base, token, requests, params)
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
                rows.append((label, requests, statistics.median(times), percentile(times, 95), len(pages[mode])))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    new_p50, new_p95 = rows[0][2], rows[0][3]
    print(f"\nGET /api/v1/worklist, {args.studies} open studies, PostgreSQL, real `triage serve` over HTTP")
    print(f"{'path':<40} {'requests':>8} {'rows':>5} {'p50 ms':>8} {'p95 ms':>8} {'p50 x':>7} {'p95 x':>7}")
    for label, requests, p50, p95, n_rows in rows:
        print(
            f"{label:<40} {requests:>8} {n_rows:>5} {p50:>8.1f} {p95:>8.1f} {p50 / new_p50:>7.1f} {p95 / new_p95:>7.1f}"
        )
    same = pages["new"] == pages["old"]
    print(f"\nfirst page identical between old and new (last request of each): {'yes' if same else 'no'}")
    print(f"target p95 < 100 ms for the new path: {'met' if new_p95 < 100 else 'not met'} ({new_p95:.1f} ms)")


if __name__ == "__main__":
    main()
