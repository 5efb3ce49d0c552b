"""Who is asking: signed-in sessions (cookie) and API tokens (Bearer), roles, and CSRF protection.

A request is authenticated by, in order: `Authorization: Bearer TOKEN` (service accounts), then the
`triage_session` cookie (people signed in through /login). State-changing requests (POST, PUT, PATCH, DELETE)
that rely on the cookie must carry the session's CSRF token in the `X-CSRF-Token` header or a `csrf_token`
form field; a cross-site page can make the browser send the cookie but cannot read the token. Bearer
requests need no CSRF token: browsers never attach them on their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import quote

from fastapi import HTTPException, Request, status

from triage.domain import utcnow
from triage.worklist.accounts import Accounts, Role, User, constant_time_equal

SESSION_COOKIE = "triage_session"
# Double-submit token for the sign-in form itself (there is no session yet to hold one).
LOGIN_CSRF_COOKIE = "triage_login_csrf"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SIGN_IN_PATH = "/login"

# People read, claim, release, report and give feedback; service accounts are machines (PACS, RIS, exporters).
HUMAN_ROLES = (Role.RADIOLOGIST, Role.ADMIN)
# Audit detail of a report marked by a service account acting as RIS bridge (TRIAGE_RIS_BRIDGE_MAY_REPORT).
RIS_BRIDGE = "ris-bridge"

__all__ = [
    "HUMAN_ROLES",
    "RIS_BRIDGE",
    "Principal",
    "SignInRequired",
    "User",
    "current_user",
    "page_user",
    "principal",
    "require_reporter",
    "require_roles",
]


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the user, how they authenticated, and (for sessions) the CSRF token."""

    user: User
    via: str  # "session" or "token"
    csrf_token: str | None = None
    session_token: str | None = None


class SignInRequired(Exception):
    """Raised by page dependencies; the app turns it into a redirect to the sign-in page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def accounts_of(request: Request) -> Accounts:
    accounts: Accounts = request.app.state.accounts
    return accounts


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


async def principal(request: Request) -> Principal | None:
    """The caller, or None when the request carries no valid token or session (cached on the request)."""
    if hasattr(request.state, "principal"):
        return request.state.principal  # type: ignore[no-any-return]
    accounts = accounts_of(request)
    found: Principal | None = None
    token = _bearer(request)
    if token is not None:
        user = await asyncio.to_thread(accounts.user_for_token, token, utcnow())
        found = Principal(user, "token") if user is not None else None
    else:
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            session = await asyncio.to_thread(accounts.session_user, cookie, utcnow())
            if session is not None:
                found = Principal(session[0], "session", csrf_token=session[1], session_token=cookie)
    request.state.principal = found
    return found


async def _submitted_csrf(request: Request) -> str:
    header = request.headers.get(CSRF_HEADER)
    if header:
        return header
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        form = await request.form()
        value = form.get(CSRF_FIELD)
        return value if isinstance(value, str) else ""
    return ""


async def check_csrf(request: Request, found: Principal) -> None:
    """Refuse (403) a cookie-authenticated state-changing request without the session's CSRF token."""
    if request.method in SAFE_METHODS or found.via != "session":
        return
    submitted = await _submitted_csrf(request)
    if not submitted or found.csrf_token is None or not constant_time_equal(submitted, found.csrf_token):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="missing or wrong CSRF token")


async def current_user(request: Request) -> User:
    """The signed-in user or token holder; 401 without valid credentials, 403 on a CSRF failure (API routes)."""
    found = await principal(request)
    if found is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="sign in or send Authorization: Bearer TOKEN",
            headers={"WWW-Authenticate": 'Bearer realm="triage"'},
        )
    await check_csrf(request, found)
    return found.user


async def page_user(request: Request) -> User:
    """Like `current_user` for pages: without credentials the browser is sent to the sign-in page."""
    found = await principal(request)
    if found is None:
        path = request.url.path
        if request.url.query:
            path += "?" + request.url.query
        raise SignInRequired(path if request.method == "GET" else "/")
    await check_csrf(request, found)
    return found.user


def refusal(user: User, allowed: frozenset[Role], action: str) -> str:
    """The 403 message: who may not do what, and who may."""
    needs = sorted(r.value for r in allowed)
    if user.role == Role.SERVICE and allowed <= frozenset(HUMAN_ROLES):
        return f"a service account (API token) may not {action}: only people may ({', '.join(needs)})"
    return f"role {user.role.value!r} may not {action}; needs one of {needs}"


def require_roles(
    *roles: Role, page: bool = False, action: str = "do this"
) -> Callable[[Request], Coroutine[Any, Any, User]]:
    """A dependency: the user if their role is one of `roles`, else 403 naming `action` and who may do it."""
    allowed = frozenset(roles)
    base = page_user if page else current_user

    async def dependency(request: Request) -> User:
        user = await base(request)
        if user.role not in allowed:
            await refuse(request, user, refusal(user, allowed, action))
        return user

    return dependency


async def refuse(request: Request, user: User, detail: str) -> NoReturn:
    """Answer 403 with `detail`, after writing the refusal to the audit log (who tried what, on which study).

    Raises:
        HTTPException: always, 403.
    """
    study_uid = request.path_params.get("study_uid")
    entry = {"method": request.method, "path": request.url.path, "role": str(user.role), "reason": detail}
    await asyncio.to_thread(accounts_of(request).audit, user.name, "forbidden", utcnow(), study_uid, entry)
    raise HTTPException(status.HTTP_403_FORBIDDEN, detail=detail)


def ris_bridge_may_report(request: Request) -> bool:
    """The site's setting `ris_bridge_may_report` (TRIAGE_RIS_BRIDGE_MAY_REPORT) of the running service."""
    return bool(request.app.state.service.settings.ris_bridge_may_report)


async def require_reporter(request: Request) -> User:
    """A dependency for marking a study reported: people always; a service account only as a RIS bridge.

    Marking reported hides a study from the default worklist, so a machine account may do it only where the
    site says a RIS bridge reports through it (`ris_bridge_may_report`); else 403 saying how to allow it.
    """
    user = await current_user(request)
    if user.role in HUMAN_ROLES:
        return user
    if user.role == Role.SERVICE and ris_bridge_may_report(request):
        return user
    await refuse(
        request,
        user,
        "a service account (API token) may not mark studies reported unless it is the site's RIS bridge:"
        " set TRIAGE_RIS_BRIDGE_MAY_REPORT=true to allow service accounts to do so",
    )


def sign_in_location(next_path: str) -> str:
    return f"{SIGN_IN_PATH}?next={quote(safe_next(next_path), safe='/')}"


def safe_next(next_path: str | None) -> str:
    """Only same-site relative paths are followed after sign-in (no open redirect to another host)."""
    if not next_path or not next_path.startswith("/") or next_path.startswith("//") or "\\" in next_path:
        return "/worklist"
    return next_path
