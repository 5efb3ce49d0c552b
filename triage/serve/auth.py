"""Who is asking: signed-in sessions and API tokens (issue #4 replaces this placeholder)."""

from __future__ import annotations

from fastapi import Request


def current_user(request: Request) -> str:
    """The acting user's name. Placeholder until sign-in and tokens exist: trusts the X-Triage-User header."""
    return request.headers.get("X-Triage-User", "anonymous")
