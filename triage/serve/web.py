"""The radiologist's pages: sign-in, the live worklist, the study view with preview and feedback, and admin pages.

Server-rendered Jinja2 with a little vanilla JavaScript (no build step). A signed-in reader sees the patient's
name, ID, age and sex, read from the stored images for the rows on the page only (the database keeps none); that
identity is never logged, and each page that shows it writes a `view-identity` audit entry (with how many studies,
not who). Every study view, claim, release, report, feedback, critical-result communication and sign-in is written
to the audit log.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import re
import secrets
from dataclasses import dataclass, fields, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Form, Query, Request, Response, status
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from triage.dicom.identity import PatientIdentity, read_identity
from triage.domain import AIStatus, PriorityLevel, utcnow
from triage.errors import ConflictError, NotFoundError, NotPermittedError, TriageError
from triage.models.states import site_label
from triage.serve import plain
from triage.serve.auth import (
    CSRF_FIELD,
    HUMAN_ROLES,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    accounts_of,
    page_user,
    require_roles,
    safe_next,
)
from triage.serve.deps import get_service
from triage.serve.service import TriageService
from triage.serve.visibility import for_reader, scope_of, sees_shadow
from triage.worklist.accounts import (
    Accounts,
    InvalidAccountError,
    Role,
    SharedSignInThrottle,
    User,
    constant_time_equal,
)
from triage.worklist.feedback import record_feedback
from triage.worklist.repository import COMMUNICATION_METHODS, ReadScope, Worklist, WorklistItem
from triage.worklist.sites import Site, parse_site

log = logging.getLogger(__name__)

PAGES_DIR = Path(__file__).resolve().parent / "pages"
TEMPLATES_DIR = PAGES_DIR / "templates"
STATIC_DIR = PAGES_DIR / "static"

PageUser = Annotated[User, Depends(page_user)]
AdminPage = Annotated[User, Depends(require_roles(Role.ADMIN, page=True))]
HumanPage = Annotated[User, Depends(require_roles(*HUMAN_ROLES, page=True, action="give feedback on AI findings"))]
# The page forms are for people; a RIS bridge marks reported through the API (TRIAGE_RIS_BRIDGE_MAY_REPORT).
ClaimPage = Annotated[User, Depends(require_roles(*HUMAN_ROLES, page=True, action="claim or release studies"))]
ReportPage = Annotated[User, Depends(require_roles(*HUMAN_ROLES, page=True, action="mark studies reported here"))]

AI_STATUSES = [s.value for s in AIStatus]
LEVELS = [level.value for level in sorted(PriorityLevel, key=lambda lv: -lv.rank)]
AUDIT_CSV_COLUMNS = ["at", "user", "action", "study_uid", "detail"]
# One page of the worklist: the database pages, and patient identity is read for these rows only, so the page
# costs the same with 50 or 5,000 open studies.
PAGE_SIZE = 100
VIEW_IDENTITY = "view-identity"


# ---------------------------------------------------------------------------------------------------- formatting
def format_minutes(value: float | None) -> str:
    """12.4 -> "12 min", 75 -> "1 h 15 min", None -> "-"."""
    if value is None:
        return "-"
    minutes = round(abs(float(value)))
    text = f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"
    return text


def format_left(value: float | None) -> str:
    """Time left to the turnaround target; a negative value is shown as overdue."""
    if value is None:
        return "-"
    return f"overdue {format_minutes(value)}" if value < 0 else format_minutes(value)


def format_time(value: datetime | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def detail_label(key: str) -> str:
    """A finding detail's key as a label: "volume_ml" -> "Volume (mL)", "key_slice_sop_instance_uid" -> "Key slice
    SOP Instance UID"."""
    text = str(key).replace("sop_instance_uid", "SOP Instance UID").replace("_uid", " UID")
    text = re.sub(r"_ml\b", " (mL)", text).replace("_", " ")
    return text[:1].upper() + text[1:]


def format_utc_clock(value: datetime | None) -> str:
    """A time as a short UTC clock, the fallback the page's script replaces with the reader's own zone."""
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%d %b %H:%M UTC")


def iso_utc(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).isoformat()


def short_uid(value: str | None) -> str:
    if not value:
        return "-"
    return value if len(value) <= 20 else "…" + value[-16:]


def build_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
    env = templates.env
    env.filters.update(
        minutes=format_minutes,
        left=format_left,
        detail_label=detail_label,
        when=format_time,
        pct=plain.percent,
        short_uid=short_uid,
        utc_clock=format_utc_clock,
        iso=iso_utc,
        finding_words=plain.finding_words,
        finding_name=plain.finding_name,
        site_targets=site_targets,
    )
    env.globals.update(levels=LEVELS, ai_statuses=AI_STATUSES, csrf_field=CSRF_FIELD)
    return templates


def _csrf(request: Request) -> str:
    found = getattr(request.state, "principal", None)
    return found.csrf_token if found is not None and found.csrf_token else ""


def _service(request: Request) -> TriageService:
    return get_service(request)


def _worklist(request: Request) -> Worklist:
    return get_service(request).worklist


async def _audit(request: Request, user: User | str, action: str, study_uid: str | None = None, **detail: Any) -> None:
    name = user.name if isinstance(user, User) else user
    await asyncio.to_thread(accounts_of(request).audit, name, action, utcnow(), study_uid, detail)


def audit_csv(accounts: Accounts, **filters: Any) -> str:
    import json

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(AUDIT_CSV_COLUMNS)
    for entry in accounts.audit_entries(limit=0, **filters):
        writer.writerow(
            [entry.at.isoformat(), entry.user, entry.action, entry.study_uid or "", json.dumps(entry.detail)]
        )
    return buffer.getvalue()


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=status.HTTP_303_SEE_OTHER)


def _with_message(url: str, *, error: str | None = None, notice: str | None = None) -> str:
    params = {k: v for k, v in (("error", error), ("notice", notice)) if v}
    if not params:
        return url
    return f"{url}{'&' if '?' in url else '?'}{urlencode(params)}"


def _study_url(study_uid: str) -> str:
    return "/studies/" + quote(study_uid, safe="")


def _told_at(value: str, zone_name: str, now: datetime) -> datetime:
    """When a result was told, from the form's local date and time in `zone_name` (the reader's browser zone, or
    the site's without script); empty: now.

    Raises:
        ValueError: when the time or the zone cannot be read.
    """
    if not value.strip():
        return now
    try:
        local = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"the time {value!r} is not a date and time (YYYY-MM-DDTHH:MM)") from None
    if local.tzinfo is not None:
        return local.astimezone(UTC)
    zone = plain.zone_of(zone_name.strip() or "UTC")
    if zone_name.strip() and zone.key != zone_name.strip():
        raise ValueError(f"unknown time zone {zone_name!r}")
    return local.replace(tzinfo=zone).astimezone(UTC)


# ---------------------------------------------------------------------------------------------------- sites form
# Offered in the site form's time zone list (any IANA name is accepted).
# fmt: off
COMMON_ZONES = (
    "UTC", "Europe/London", "Europe/Dublin", "Europe/Paris", "Europe/Berlin", "Africa/Johannesburg", "Asia/Dubai",
    "Asia/Karachi", "Asia/Kolkata", "Asia/Singapore", "Asia/Manila", "Australia/Perth", "Australia/Sydney",
    "Pacific/Auckland", "America/New_York", "America/Chicago", "America/Denver", "America/Los_Angeles",
    "America/Sao_Paulo",
)
# fmt: on


def _names(text: str, *, commas: bool) -> list[str]:
    """One value a line (and, where `commas`, comma-separated too: AE titles and accounts hold none)."""
    parts = re.split(r"[\n,]" if commas else r"\n", text)
    return [p.strip() for p in parts if p.strip()]


def _site_record(form: dict[str, str]) -> dict[str, Any]:
    """A site record (or the changed fields of one) from the admin page's form.

    Raises:
        ValueError: when a target or the claim idle time is not a number of minutes.
    """
    record: dict[str, Any] = {
        "name": form.get("name", ""),
        "ae_titles": _names(form.get("ae_titles", ""), commas=True),
        "institution_names": _names(form.get("institution_names", ""), commas=False),
        "stow_accounts": _names(form.get("stow_accounts", ""), commas=True),
        "time_zone": form.get("time_zone", "").strip() or "UTC",
    }
    targets: dict[str, float] = {}
    for level in LEVELS:
        value = form.get(f"target_{level}", "").strip()
        if value:
            try:
                targets[level] = float(value)
            except ValueError:
                raise ValueError(f"the {level} target must be minutes, got {value!r}") from None
    record["turnaround_min"] = targets or None
    idle = form.get("claim_idle_min", "").strip()
    if idle:
        try:
            record["claim_idle_min"] = float(idle)
        except ValueError:
            raise ValueError(f"the claim idle time must be minutes, got {idle!r}") from None
    return record


def _until(value: str) -> date | None:
    if not value.strip():
        return None
    try:
        return date.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"until {value!r} is not a date; use YYYY-MM-DD") from None


def site_targets(site: Site) -> str:
    """The site's own targets for the sites table ("stat 20 min, urgent 120 min"); "default" when it sets none."""
    if not site.turnaround_min:
        return "default"
    return ", ".join(f"{level} {site.turnaround_min[level]:g} min" for level in LEVELS if level in site.turnaround_min)


# ---------------------------------------------------------------------------------------------------- sign-in
def build_sign_in(templates: Jinja2Templates, throttle: SharedSignInThrottle) -> APIRouter:
    """/login and /logout. The sign-in form is public; its CSRF token is a double-submit cookie."""
    router = APIRouter(tags=["pages"], include_in_schema=False)

    def render_login(request: Request, next_path: str, message: str = "", code: int = 200) -> HTMLResponse:
        token = secrets.token_urlsafe(32)
        response = templates.TemplateResponse(
            request,
            "login.html",
            {"next": safe_next(next_path), "message": message, "login_csrf": token, "user": None},
            status_code=code,
        )
        response.set_cookie(
            LOGIN_CSRF_COOKIE,
            token,
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
            path="/login",
            max_age=3600,
        )
        return response

    @router.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/worklist") -> HTMLResponse:  # noqa: A002 - the query name
        return render_login(request, next)

    @router.post("/login", response_class=HTMLResponse)
    async def login(
        request: Request,
        username: Annotated[str, Form()] = "",
        password: Annotated[str, Form()] = "",
        csrf_token: Annotated[str, Form()] = "",
        next: Annotated[str, Form()] = "/worklist",  # noqa: A002
    ) -> Response:
        cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not cookie or not csrf_token or not constant_time_equal(cookie, csrf_token):
            return render_login(request, next, "The sign-in form expired; please sign in again.", 400)
        accounts = accounts_of(request)
        name = username.strip()
        # In the database: guesses spread over several API replicas count together.
        wait_s = await asyncio.to_thread(throttle.wait_s, name, utcnow())
        if wait_s > 0:
            await _audit(request, "(throttled)", "sign-in-throttled")
            return render_login(
                request, next, f"Too many failed sign-ins for this user; try again in {wait_s:.0f} s.", 429
            )
        user = await asyncio.to_thread(accounts.verify_password, name, password, utcnow())
        if user is None:
            await asyncio.to_thread(throttle.failed, name, utcnow())
            known = await asyncio.to_thread(lambda: name in {u.name for u in accounts.list_users()})
            await _audit(request, name[:64] if known else "(unknown)", "sign-in-failed")
            log.info("failed sign-in (%s user name)", "known" if known else "unknown")
            return render_login(request, next, "Wrong user name or password, or the account is disabled.", 401)
        await asyncio.to_thread(throttle.succeeded, name)
        sign_in = await asyncio.to_thread(accounts.start_session, user, utcnow())
        await _audit(request, user, "sign-in")
        response = _redirect(safe_next(next))
        response.set_cookie(
            SESSION_COOKIE,
            sign_in.token,
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
            path="/",
            max_age=int(accounts.session_ttl.total_seconds()),
        )
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return response

    @router.post("/logout")
    async def logout(request: Request, user: PageUser) -> Response:
        token = request.cookies.get(SESSION_COOKIE)
        if token:
            await asyncio.to_thread(accounts_of(request).end_session, token)
        await _audit(request, user, "sign-out")
        response = _redirect("/login")
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    return router


# ---------------------------------------------------------------------------------------------------- worklist
def _tristate(value: str, name: str) -> bool | None:
    """A yes/no/any filter from a form: "" -> None, "true" -> True, "false" -> False.

    Raises:
        ValueError: quoting the value when it is none of these.
    """
    text = value.strip().lower()
    if text in ("", "any"):
        return None
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


@dataclass(frozen=True)
class WorklistFilters:
    """The worklist page's filters and page, as its form and links carry them."""

    status: str = ""
    modality: str = ""
    level: str = ""
    site: str = ""
    accession: str = ""
    include_reported: bool = False
    flagged: str = ""
    claimed: str = ""
    offset: int = 0

    def query(self, **changes: Any) -> str:
        """The query string of these filters (with `changes`), without the defaults."""
        values = replace(self, **changes)
        params = {}
        for field in fields(values):
            value = getattr(values, field.name)
            if value in ("", False, 0):
                continue
            params[field.name] = "true" if value is True else value
        return urlencode(params)

    def url(self, **changes: Any) -> str:
        query = self.query(**changes)
        return "/worklist" + (f"?{query}" if query else "")


def worklist_filters(
    status_: Annotated[str | None, Query(alias="status")] = None,
    modality: str | None = None,
    level: str | None = None,
    site: str | None = None,
    accession: str | None = None,
    include_reported: bool = False,
    flagged: str | None = None,
    claimed: str | None = None,
    offset: int = 0,
) -> WorklistFilters:
    return WorklistFilters(
        status=status_ or "",
        modality=modality or "",
        level=level or "",
        site=site or "",
        accession=(accession or "").strip(),
        include_reported=include_reported,
        flagged=(flagged or "").strip().lower(),
        claimed=(claimed or "").strip().lower(),
        offset=max(0, offset),
    )


Filters = Annotated[WorklistFilters, Depends(worklist_filters)]


@dataclass
class WorklistPage:
    """One page of the worklist for a reader: its rows (with identity where it was read), whether more follow,
    the counts per level for the same filters, and the problem with the filters if any."""

    items: list[WorklistItem]
    rows: list[plain.ReadingRow]
    more: bool
    counts: dict[str, int]
    problem: str | None = None

    @property
    def identities_shown(self) -> int:
        return sum(1 for row in self.rows if row.identity is not None)


def read_identities(service: TriageService, study_uids: list[str]) -> dict[str, PatientIdentity | None]:
    """Each study's patient identity, from its first stored instance (one query for the keys, one header read per
    study). Never logged: `read_identity` logs only the store key when a header cannot be read."""
    keys = service.worklist.first_instance_keys(study_uids)
    return {uid: read_identity(service.files, keys[uid]) if uid in keys else None for uid in study_uids}


def readable_sites(sites: list[str], scope: ReadScope | None, registered: set[str]) -> list[str]:
    """The site menu's entries a reader may read: a credentialed reader is not shown other clients' names."""
    if scope is None:
        return sites
    return [s for s in sites if (s in scope.sites if s in registered else scope.unregistered)]


def _counts_text(counts: dict[str, int]) -> str:
    return " ".join(f"{level}={counts.get(level, 0)}" for level in LEVELS)


# ---------------------------------------------------------------------------------------------------- pages
def _viewer(detail: Any, template: str) -> dict[str, Any]:
    """What the study page's image scroller starts with: the series to offer, the one analysed by the first finding
    (else the first), the image the AI region was drawn on, and the "open in viewer" link."""
    series = [s for s in detail.series if s.n_instances > 0 and s.modality not in ("SR", "PR", "KO", "SEG")]
    analysed = next((f.series_uid for f in detail.findings if f.series_uid), "")
    default = analysed if any(s.series_uid == analysed for s in series) else (series[0].series_uid if series else "")
    key_sop = next((f.overlay_sop_instance_uid or "" for f in detail.findings if f.series_uid == default), "")
    link = ""
    if template:
        link = template.replace("{study_uid}", quote(detail.study_uid)).replace(
            "{accession}", quote(detail.accession_number or "")
        )
    return {"viewer_series": series, "viewer_default": default, "viewer_key_sop": key_sop, "viewer_link": link}


def build_pages(templates: Jinja2Templates) -> APIRouter:
    """Every page here needs a signed-in user; without one the browser is redirected to /login."""
    router = APIRouter(tags=["pages"], include_in_schema=False, dependencies=[Depends(page_user)])

    def render(request: Request, name: str, user: User, code: int = 200, **context: Any) -> HTMLResponse:
        context.update(user=user, csrf=_csrf(request), error=request.query_params.get("error"))
        context.setdefault("notice", request.query_params.get("notice"))
        return templates.TemplateResponse(request, name, context, status_code=code)

    @router.get("/")
    def home() -> RedirectResponse:
        return _redirect("/worklist")

    def reading_scope(request: Request, user: User) -> ReadScope | None:
        service = _service(request)
        return scope_of(user, service.worklist, service.settings)

    async def check_reading(request: Request, user: User, study_uid: str, action: str) -> str | None:
        """None when `user` may read the study; else why not (the refusal is audited)."""
        try:
            await asyncio.to_thread(_worklist(request).check_scope, study_uid, reading_scope(request, user))
        except NotPermittedError as exc:
            await _audit(request, user, "access-denied", study_uid, attempted=action, reason=str(exc))
            return str(exc)
        return None

    def audit_identity(request: Request, user: User, shown: int, page: str, study_uid: str | None = None) -> None:
        """One entry per page that showed patient identity: which page and how many studies, never who."""
        if shown:
            detail = {"page": page, "studies": shown}
            accounts_of(request).audit(user.name, VIEW_IDENTITY, utcnow(), study_uid, detail)

    def worklist_page_of(
        request: Request, user: User, filters: WorklistFilters, identity_for: set[str] | None = None
    ) -> WorklistPage:
        """The page of the worklist `filters` ask for, in the reader's scope; identity is read for the rows in
        `identity_for` (None: every row of the page)."""
        service = _service(request)
        worklist = service.worklist
        now = utcnow()
        scope = reading_scope(request, user)
        try:
            flagged = _tristate(filters.flagged, "AI flag")
            claimed = _tristate(filters.claimed, "claimed")
            common: dict[str, Any] = dict(
                status=filters.status or None,
                modality=filters.modality or None,
                site=filters.site or None,
                include_reported=filters.include_reported,
                scope=scope,
                claimed=claimed,
                flagged=flagged,
            )
            items = worklist.list_worklist(
                now,
                level=filters.level or None,
                accession=filters.accession or None,
                limit=PAGE_SIZE + 1,
                offset=filters.offset,
                **common,
            )
            counts = worklist.count_by_level(now, **common)
        except ValueError as exc:
            return WorklistPage([], [], False, {}, str(exc))
        more = len(items) > PAGE_SIZE
        items = [for_reader(item, user) for item in items[:PAGE_SIZE]]
        wanted = [i.study_uid for i in items if identity_for is None or i.study_uid in identity_for]
        identities = read_identities(service, wanted)
        rows = [plain.reading_row(i, identities.get(i.study_uid), now) for i in items if i.study_uid in identities]
        return WorklistPage(items, rows, more, counts)

    @router.get("/worklist", response_class=HTMLResponse)
    def worklist_page(request: Request, user: PageUser, filters: Filters) -> HTMLResponse:
        page = worklist_page_of(request, user, filters)
        audit_identity(request, user, page.identities_shown, "worklist")
        worklist = _worklist(request)
        modalities, sites = worklist.worklist_facets()
        sites = readable_sites(sites, reading_scope(request, user), worklist.sites.names())
        total = None
        if not filters.accession and page.counts:
            total = page.counts.get(filters.level, 0) if filters.level else sum(page.counts.values())
        return render(
            request,
            "worklist.html",
            user,
            400 if page.problem else 200,
            rows=page.rows,
            page=page,
            filters=filters,
            here=filters.url(),
            total=total,
            page_size=PAGE_SIZE,
            modalities=modalities,
            sites=sites,
            problem=page.problem,
            body_class="wide",
        )

    @router.get("/worklist/rows", response_class=HTMLResponse)
    def worklist_rows(
        request: Request,
        user: PageUser,
        filters: Filters,
        changed: Annotated[str | None, Query(description="Space- or comma-separated Study UIDs")] = None,
    ) -> HTMLResponse:
        """The table body, for the live refresh (same template as the page), with the counts per level in the
        X-Worklist-Counts header ("stat=1 urgent=0 routine=3").

        With `changed` (the studies named by the change events since the last refresh) only those rows are sent,
        with the page's order in the X-Worklist-Order header: the page keeps its other rows and reorders them.
        """
        wanted = None if changed is None else set(changed.replace(",", " ").split())
        page = worklist_page_of(request, user, filters, wanted)
        audit_identity(request, user, page.identities_shown, "worklist")
        code = 400 if page.problem else 200
        response = render(request, "_rows.html", user, code, rows=page.rows, problem=page.problem,
                          here=filters.url(), filters=filters)  # fmt: skip
        if not page.problem:
            response.headers["X-Worklist-Counts"] = _counts_text(page.counts)
            if wanted is not None:
                response.headers["X-Worklist-Order"] = " ".join(i.study_uid for i in page.items)
        return response

    @router.post("/worklist/next")
    async def next_study_page(
        request: Request,
        user: ClaimPage,
        next: Annotated[str, Form()] = "",  # noqa: A002
    ) -> Response:
        """Claim the highest-priority unclaimed study the reader may read and open it (audited as a claim)."""
        back = safe_next(next) if next else "/worklist"
        scope = reading_scope(request, user)
        item = await asyncio.to_thread(_worklist(request).next_study, user.name, utcnow(), scope)
        if item is None:
            return _redirect(_with_message(back, notice="No unclaimed study is left that you may read."))
        await _audit(request, user, "claim", item.study_uid, via="page", next_study=True)
        notice = "Claimed for you: the highest-priority unclaimed study you may read."
        return _redirect(_with_message(_study_url(item.study_uid), notice=notice))

    @router.get("/studies/{study_uid}", response_class=HTMLResponse)
    async def study_page(request: Request, study_uid: str, user: PageUser) -> HTMLResponse:
        try:
            refused = await check_reading(request, user, study_uid, "view")
            if refused:
                return render(request, "error.html", user, 403, title="Not a site you may read", message=refused)
            detail = await asyncio.to_thread(_worklist(request).get_study, study_uid, utcnow())
            await asyncio.to_thread(_worklist(request).touch_claim, study_uid, user.name, utcnow())
        except NotFoundError as exc:
            return render(request, "error.html", user, 404, title="Study not found", message=str(exc))
        detail = for_reader(detail, user)
        await _audit(request, user, "view", study_uid, page="study")
        service = _service(request)
        identity = (await asyncio.to_thread(read_identities, service, [study_uid])).get(study_uid)
        if identity is not None:
            await _audit(request, user, VIEW_IDENTITY, study_uid, page="study", studies=1)
        feedback = await asyncio.to_thread(accounts_of(request).feedback_entries, study_uid)
        models = sorted(
            {s.routing.model for s in detail.series if s.routing is not None and s.routing.model}
            | {f.model for f in detail.findings if f.model}
        )
        labels = sorted(
            {f.label for f in detail.findings if f.label}
            | {spec.label for m in service.registry.all() for spec in m.card.findings}
        )
        previews_to_show = [i for i, f in enumerate(detail.findings) if f.overlay_file]
        now = utcnow()
        zone = plain.zone_of(detail.site_time_zone)
        return render(
            request,
            "study.html",
            user,
            study=detail,
            item=detail,
            row=plain.reading_row(detail, identity, now),
            feedback=feedback,
            models=models,
            labels=labels,
            previews=previews_to_show,
            study_url=_study_url(study_uid),
            methods=COMMUNICATION_METHODS,
            told_at_default=now.astimezone(zone).strftime("%Y-%m-%dT%H:%M"),
            told_zone_default=detail.site_time_zone or "UTC",
            messages=await asyncio.to_thread(service.outbox.messages, study_uid),
            **_viewer(detail, service.settings.viewer_url_template),
        )

    @router.post("/studies/{study_uid}/communications")
    async def communication_page(
        request: Request,
        study_uid: str,
        user: HumanPage,
        recipient: Annotated[str, Form()] = "",
        method: Annotated[str, Form()] = "",
        told_at: Annotated[str, Form()] = "",
        zone: Annotated[str, Form()] = "",
        note: Annotated[str, Form()] = "",
    ) -> Response:
        """Record that a critical result was told to the care team: whom, by what means, when (audited)."""
        url = _study_url(study_uid)
        refused = await check_reading(request, user, study_uid, "communicate")
        if refused:
            return _redirect(_with_message("/worklist", error=refused))
        now = utcnow()
        try:
            at = _told_at(told_at, zone, now)
            entry = await asyncio.to_thread(
                _worklist(request).record_communication, study_uid, user.name, recipient, method, at, now, note
            )
        except (ValueError, NotFoundError) as exc:
            return _redirect(_with_message(url, error=f"Communication not recorded: {exc}"))
        await _audit(request, user, "critical-communicated", study_uid, recipient=entry.recipient,
                     method=entry.method, at=entry.at.isoformat(), via="page")  # fmt: skip
        return _redirect(_with_message(url, notice="Critical-result communication recorded."))

    async def act(request: Request, study_uid: str, user: User, action: str, next_url: str) -> Response:
        worklist = _worklist(request)
        try:
            refused = await check_reading(request, user, study_uid, action)
            if refused:
                return _redirect(_with_message(next_url, error=refused))
            if action == "claim":
                await asyncio.to_thread(worklist.claim, study_uid, user.name, utcnow())
            elif action == "release":
                await asyncio.to_thread(worklist.release, study_uid, user.name, user.is_admin, utcnow())
            else:
                await asyncio.to_thread(worklist.mark_reported, study_uid, user.name, utcnow())
        except (ConflictError, NotFoundError) as exc:
            await _audit(request, user, f"{action}-refused", study_uid, reason=str(exc))
            return _redirect(_with_message(next_url, error=str(exc)))
        await _audit(request, user, action, study_uid)
        done = {"claim": "Claimed.", "release": "Released.", "report": "Marked as reported."}[action]
        return _redirect(_with_message(next_url, notice=done))

    def _back(next_url: str, study_uid: str) -> str:
        return safe_next(next_url) if next_url else _study_url(study_uid)

    @router.post("/studies/{study_uid}/claim")
    async def claim_page(
        request: Request,
        study_uid: str,
        user: ClaimPage,
        next: Annotated[str, Form()] = "",  # noqa: A002
    ) -> Response:
        return await act(request, study_uid, user, "claim", _back(next, study_uid))

    @router.post("/studies/{study_uid}/release")
    async def release_page(
        request: Request,
        study_uid: str,
        user: ClaimPage,
        next: Annotated[str, Form()] = "",  # noqa: A002
    ) -> Response:
        return await act(request, study_uid, user, "release", _back(next, study_uid))

    @router.post("/studies/{study_uid}/report")
    async def report_page(
        request: Request,
        study_uid: str,
        user: ReportPage,
        next: Annotated[str, Form()] = "",  # noqa: A002
    ) -> Response:
        return await act(request, study_uid, user, "report", _back(next, study_uid))

    @router.post("/studies/{study_uid}/requeue")
    async def requeue_page(
        request: Request,
        study_uid: str,
        user: AdminPage,
        next: Annotated[str, Form()] = "",  # noqa: A002
    ) -> Response:
        """An admin queues the study for a fresh AI analysis (after a failure, or a model update)."""
        next_url = _back(next, study_uid)
        try:
            await asyncio.to_thread(_service(request).requeue, study_uid, user.name)
        except (ConflictError, NotFoundError) as exc:
            await _audit(request, user, "requeue-refused", study_uid, reason=str(exc))
            return _redirect(_with_message(next_url, error=str(exc)))
        await _audit(request, user, "requeue", study_uid)
        return _redirect(_with_message(next_url, notice="Queued for a fresh AI analysis."))

    @router.post("/studies/{study_uid}/feedback")
    async def feedback_page(
        request: Request,
        study_uid: str,
        user: HumanPage,
        verdict: Annotated[str, Form()],
        finding: Annotated[str, Form()] = "",
        label: Annotated[str, Form()] = "",
        model: Annotated[str, Form()] = "",
        model_version: Annotated[str, Form()] = "",
        comment: Annotated[str, Form()] = "",
    ) -> Response:
        url = _study_url(study_uid)
        refused = await check_reading(request, user, study_uid, "feedback")
        if refused:
            return _redirect(_with_message("/worklist", error=refused))
        try:
            index = int(finding) if finding.strip() else None
            await asyncio.to_thread(
                record_feedback,
                _worklist(request),
                accounts_of(request),
                study_uid,
                user.name,
                verdict,
                index,
                label,
                model,
                comment,
                model_version,
                now=utcnow(),
                include_shadow=sees_shadow(user),
            )
        except (InvalidAccountError, NotFoundError, ConflictError, ValueError) as exc:
            return _redirect(_with_message(url, error=f"Feedback not saved: {exc}"))
        return _redirect(_with_message(url, notice="Feedback saved. Thank you."))

    # ------------------------------------------------------------------------------------------ admin
    @router.get("/admin/audit", response_class=HTMLResponse)
    def audit_page(
        request: Request,
        user: AdminPage,
        who: str | None = None,
        action: str | None = None,
        study: str | None = None,
        page: Annotated[int, Query(ge=1)] = 1,
    ) -> HTMLResponse:
        per_page = 100
        entries = accounts_of(request).audit_entries(
            limit=per_page + 1,
            offset=(page - 1) * per_page,
            user=who or None,
            action=action or None,
            study_uid=study or None,
        )
        query = urlencode({k: v for k, v in (("who", who), ("action", action), ("study", study)) if v})
        return render(
            request,
            "audit.html",
            user,
            entries=entries[:per_page],
            more=len(entries) > per_page,
            page=page,
            filters={"who": who or "", "action": action or "", "study": study or ""},
            query=query,
        )

    @router.get("/admin/audit.csv")
    def audit_export(
        request: Request, user: AdminPage, who: str | None = None, action: str | None = None, study: str | None = None
    ) -> Response:
        accounts = accounts_of(request)
        body = audit_csv(accounts, user=who or None, action=action or None, study_uid=study or None)
        accounts.audit(user.name, "export-audit", utcnow())
        return Response(
            body, media_type="text/csv", headers={"Content-Disposition": 'attachment; filename="triage-audit.csv"'}
        )

    @router.get("/admin/models", response_class=HTMLResponse)
    def models_page(request: Request, user: AdminPage) -> HTMLResponse:
        service = _service(request)
        current, alerts = service.measure_models(utcnow())
        return render(
            request,
            "models.html",
            user,
            states=service.model_states.status(),
            activity=[a.to_dict() for a in current],
            alerts=alerts,
            window_h=service.settings.models.drift_window_h,
            site_label=site_label,
        )

    @router.post("/admin/models/state")
    async def model_state_page(request: Request, user: AdminPage) -> Response:
        form = await request.form()
        model, version, site = str(form.get("model", "")), str(form.get("version", "")), str(form.get("site", ""))
        state, why = str(form.get("state", "")), str(form.get("why", "")).strip()
        states = _service(request).model_states
        try:
            if state == "rollback":
                await asyncio.to_thread(states.rollback, model, site, user.name, utcnow(), version or None, why)
            else:
                await asyncio.to_thread(states.set_state, model, site, state, user.name, utcnow(), why, version or None)
        except TriageError as exc:
            return _redirect(_with_message("/admin/models", error=str(exc)))
        return _redirect(_with_message("/admin/models", notice=f"{model} {version} at {site_label(site)}: done"))

    # ------------------------------------------------------------------------------------------ sites
    def sites_context(request: Request, editing: str = "") -> dict[str, Any]:
        worklist = _worklist(request)
        sites = worklist.sites.all()
        today = utcnow().date()
        readers = [u.name for u in accounts_of(request).list_users() if u.role == Role.RADIOLOGIST and not u.disabled]
        return {
            "sites": sites,
            "privileges": worklist.sites.privileges(),
            "today": today,
            "readers": readers,
            "levels": LEVELS,
            "editing": worklist.sites.find(editing) if editing else None,
            "zones": COMMON_ZONES,
        }

    @router.get("/admin/sites", response_class=HTMLResponse)
    def sites_page(request: Request, user: AdminPage, edit: str = "") -> HTMLResponse:
        return render(request, "sites.html", user, **sites_context(request, edit))

    @router.post("/admin/sites")
    async def save_site_page(request: Request, user: AdminPage) -> Response:
        """Add a site, or change one (`original` names it): audited by the site records; open studies are
        recognised and rescored at once."""
        form = await request.form()
        values = {k: str(v) for k, v in form.items()}
        original = values.get("original", "").strip()
        worklist = _worklist(request)
        try:
            record = _site_record(values)
            if original:
                record.pop("name", None)
                site, moved, rescored = await asyncio.to_thread(
                    worklist.update_site, original, record, user.name, utcnow()
                )
                done = "changed"
            else:
                site = parse_site(record)
                moved, rescored = await asyncio.to_thread(worklist.save_site, site, user.name, utcnow(), create=True)
                done = "added"
        except (TriageError, ValueError) as exc:
            back = "/admin/sites" + (f"?{urlencode({'edit': original})}" if original else "")
            return _redirect(_with_message(back, error=str(exc)))
        notice = f"Site {site.name} {done}: {moved} open studies recognised anew, {rescored} rescored."
        return _redirect(_with_message("/admin/sites", notice=notice))

    @router.post("/admin/sites/{name}/remove")
    async def remove_site_page(request: Request, name: str, user: AdminPage) -> Response:
        try:
            moved, rescored = await asyncio.to_thread(_worklist(request).remove_site, name, user.name, utcnow())
        except TriageError as exc:
            return _redirect(_with_message("/admin/sites", error=str(exc)))
        notice = f"Site {name} removed with its privileges: {moved} open studies now follow the default rules."
        return _redirect(_with_message("/admin/sites", notice=notice))

    @router.post("/admin/sites/privileges")
    async def grant_page(
        request: Request,
        user: AdminPage,
        username: Annotated[str, Form()],
        site: Annotated[str, Form()],
        until: Annotated[str, Form()] = "",
    ) -> Response:
        """Let a radiologist read a site's studies until a date (inclusive; empty: no expiry). Audited."""
        try:
            reader = await asyncio.to_thread(accounts_of(request).get_user, username.strip())
            if reader.role != Role.RADIOLOGIST:
                raise ValueError(
                    f"{reader.name!r} has role {reader.role.value}; privileges are for radiologists "
                    "(admins and services see every site)"
                )
            day = _until(until)
            granted = await asyncio.to_thread(
                _worklist(request).sites.grant, reader.name, site, day, user.name, utcnow()
            )
        except (TriageError, ValueError) as exc:
            return _redirect(_with_message("/admin/sites", error=str(exc)))
        ends = f"until {granted.until.isoformat()}" if granted.until else "with no expiry"
        return _redirect(_with_message("/admin/sites", notice=f"{granted.username} may read {granted.site} {ends}."))

    @router.post("/admin/sites/privileges/revoke")
    async def revoke_page(
        request: Request, user: AdminPage, username: Annotated[str, Form()], site: Annotated[str, Form()]
    ) -> Response:
        gone = await asyncio.to_thread(_worklist(request).sites.revoke, username, site, user.name, utcnow())
        if not gone:
            return _redirect(_with_message("/admin/sites", error=f"{username} held no privilege for {site}."))
        return _redirect(_with_message("/admin/sites", notice=f"{username} may no longer read {site}."))

    @router.get("/admin/users", response_class=HTMLResponse)
    def users_page(request: Request, user: AdminPage) -> HTMLResponse:
        return render(
            request, "users.html", user, users=accounts_of(request).list_users(), roles=[r.value for r in Role]
        )

    @router.post("/admin/users", response_class=HTMLResponse)
    def add_user_page(
        request: Request,
        user: AdminPage,
        name: Annotated[str, Form()],
        role: Annotated[str, Form()],
        password: Annotated[str, Form()] = "",
    ) -> Response:
        accounts = accounts_of(request)
        try:
            created, secret = accounts.add_user(name.strip(), role, password or None, utcnow())
        except (InvalidAccountError, ConflictError) as exc:
            return _redirect(_with_message("/admin/users", error=str(exc)))
        accounts.audit(user.name, "user-add", utcnow(), detail={"name": created.name, "role": created.role.value})
        # The secret is shown once, in this response only (never in a URL or the log).
        return render(
            request,
            "users.html",
            user,
            users=accounts.list_users(),
            roles=[r.value for r in Role],
            created=created,
            secret=secret if (created.role == Role.SERVICE or not password) else None,
        )

    @router.post("/admin/users/{name}/disable")
    def disable_user_page(request: Request, name: str, user: AdminPage) -> Response:
        return _set_disabled(request, name, user, True)

    @router.post("/admin/users/{name}/enable")
    def enable_user_page(request: Request, name: str, user: AdminPage) -> Response:
        return _set_disabled(request, name, user, False)

    def _set_disabled(request: Request, name: str, user: User, disabled: bool) -> Response:
        if disabled and name == user.name:
            return _redirect(_with_message("/admin/users", error="You cannot disable your own account."))
        accounts = accounts_of(request)
        try:
            accounts.set_disabled(name, disabled)
        except NotFoundError as exc:
            return _redirect(_with_message("/admin/users", error=str(exc)))
        accounts.audit(user.name, "user-disable" if disabled else "user-enable", utcnow(), detail={"name": name})
        return _redirect(_with_message("/admin/users", notice=f"{name} {'disabled' if disabled else 'enabled'}."))

    return router
