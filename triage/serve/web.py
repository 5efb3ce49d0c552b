"""The radiologist's pages: sign-in, the live worklist, the study view with preview and feedback, and admin pages.

Server-rendered Jinja2 with a little vanilla JavaScript (no build step). Pages show accession numbers and the
study's own description, never patient names or birth dates. Every study view, claim, release, report, feedback
and sign-in is written to the audit log.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Form, Query, Request, Response, status
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from triage.domain import AIStatus, PriorityLevel, utcnow
from triage.errors import ConflictError, NotFoundError, NotPermittedError, TriageError
from triage.models.states import site_label
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
from triage.worklist.repository import ReadScope, Worklist, WorklistItem

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


def format_probability(value: Any) -> str:
    """0.934 -> "93%"; the ends are shown as ">99%" and "<1%" so that 0.998 never reads as certainty."""
    try:
        percent = float(value) * 100
    except (TypeError, ValueError):
        return "-"
    if percent > 99.5:
        return ">99%"
    if percent < 0.5:
        return "<1%"
    return f"{percent:.0f}%"


def detail_label(key: str) -> str:
    """A finding detail's key as a label: "volume_ml" -> "Volume (mL)", "key_slice_sop_instance_uid" -> "Key slice
    SOP Instance UID"."""
    text = str(key).replace("sop_instance_uid", "SOP Instance UID").replace("_uid", " UID")
    text = re.sub(r"_ml\b", " (mL)", text).replace("_", " ")
    return text[:1].upper() + text[1:]


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
        pct=format_probability,
        short_uid=short_uid,
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
    return f"{url}?{urlencode(params)}" if params else url


def _study_url(study_uid: str) -> str:
    return "/studies/" + quote(study_uid, safe="")


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


# ---------------------------------------------------------------------------------------------------- pages
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

    def worklist_items(
        request: Request,
        user: User,
        status_: str | None,
        modality: str | None,
        level: str | None,
        site: str | None,
        accession: str | None,
        include_reported: bool,
    ) -> tuple[list[WorklistItem], str | None]:
        try:
            items = _worklist(request).list_worklist(
                utcnow(),
                status=status_ or None,
                modality=modality or None,
                level=level or None,
                site=site or None,
                accession=(accession or "").strip() or None,
                include_reported=include_reported,
                scope=reading_scope(request, user),
            )
        except ValueError as exc:
            return [], str(exc)
        return items, None

    @router.get("/worklist", response_class=HTMLResponse)
    def worklist_page(
        request: Request,
        user: PageUser,
        status_: Annotated[str | None, Query(alias="status")] = None,
        modality: str | None = None,
        level: str | None = None,
        site: str | None = None,
        accession: str | None = None,
        include_reported: bool = False,
    ) -> HTMLResponse:
        items, problem = worklist_items(request, user, status_, modality, level, site, accession, include_reported)
        items = [for_reader(item, user) for item in items]
        filters = {
            "status": status_ or "",
            "modality": modality or "",
            "level": level or "",
            "site": site or "",
            "accession": accession or "",
            "include_reported": include_reported,
        }
        modalities, sites = _worklist(request).worklist_facets()
        return render(
            request,
            "worklist.html",
            user,
            400 if problem else 200,
            items=items,
            filters=filters,
            modalities=modalities,
            sites=sites,
            problem=problem,
        )

    @router.get("/worklist/rows", response_class=HTMLResponse)
    def worklist_rows(
        request: Request,
        user: PageUser,
        status_: Annotated[str | None, Query(alias="status")] = None,
        modality: str | None = None,
        level: str | None = None,
        site: str | None = None,
        accession: str | None = None,
        include_reported: bool = False,
        changed: Annotated[str | None, Query(description="Space- or comma-separated Study UIDs")] = None,
    ) -> HTMLResponse:
        """The table body, for the live refresh (same template as the page).

        With `changed` (the studies named by the change events since the last refresh) only those rows are sent,
        with the page's order in the X-Worklist-Order header: the page keeps its other rows and reorders them.
        """
        items, problem = worklist_items(request, user, status_, modality, level, site, accession, include_reported)
        items = [for_reader(item, user) for item in items]
        if changed is None or problem:
            return render(request, "_rows.html", user, 400 if problem else 200, items=items, problem=problem)
        wanted = set(changed.replace(",", " ").split())
        response = render(request, "_rows.html", user, 200, items=[i for i in items if i.study_uid in wanted])
        response.headers["X-Worklist-Order"] = " ".join(i.study_uid for i in items)
        return response

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
        feedback = await asyncio.to_thread(accounts_of(request).feedback_entries, study_uid)
        service = _service(request)
        models = sorted(
            {s.routing.model for s in detail.series if s.routing is not None and s.routing.model}
            | {f.model for f in detail.findings if f.model}
        )
        labels = sorted(
            {f.label for f in detail.findings if f.label}
            | {spec.label for m in service.registry.all() for spec in m.card.findings}
        )
        previews_to_show = [i for i, f in enumerate(detail.findings) if f.overlay_file]
        return render(
            request,
            "study.html",
            user,
            study=detail,
            item=detail,
            feedback=feedback,
            models=models,
            labels=labels,
            previews=previews_to_show,
            study_url=_study_url(study_uid),
        )

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
