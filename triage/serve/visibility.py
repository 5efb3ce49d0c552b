"""What each reader may see: the studies of the sites they hold a privilege for, and of those studies' AI results
no finding of a model in shadow for a radiologist.

Credentialed reading: a radiologist reads only for the client hospitals where they hold a licence, so a study of a
registered site is listed, shown and claimable only for radiologists with a privilege for that site valid today
(`triage users grant`). Admins and service accounts see every study. Studies of senders no site claims are shown
to radiologists per `reading.unregistered_visible` (unset: only while no site is registered).

A shadow model runs on live traffic so that admins and ML engineers can compare it with the active one; its
findings must not change what a radiologist reads (STYLE: a model not validated for a site never raises
priority there, and its flags must not colour a read either). Admins and service accounts (the ML engineer's
scripts) see them, each marked `shadow: true`. Shadow findings are stored after the active ones, so the index of
every finding a radiologist sees is the same in both views (feedback and previews name findings by index).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TypeVar

from triage.config import Settings
from triage.worklist.accounts import Role, User
from triage.worklist.repository import ReadScope, Worklist, WorklistItem

Item = TypeVar("Item", bound=WorklistItem)


def sees_shadow(user: User) -> bool:
    """Whether `user` may see shadow findings: admins and service accounts, not radiologists."""
    return user.role in (Role.ADMIN, Role.SERVICE)


def for_reader(item: Item, user: User) -> Item:
    """`item` as `user` may see it: without shadow findings for a radiologist."""
    if sees_shadow(user) or not any(f.shadow for f in item.findings):
        return item
    return item.model_copy(update={"findings": [f for f in item.findings if not f.shadow]})


def scope_of(user: User, worklist: Worklist, settings: Settings, now: datetime | None = None) -> ReadScope | None:
    """The studies `user` may read now: None (all) for admins and service accounts; for a radiologist the sites
    with a privilege valid today (UTC date) and, per the setting, unregistered senders."""
    if user.role != Role.RADIOLOGIST:
        return None
    today = (now or datetime.now(UTC)).astimezone(UTC).date()
    unregistered = settings.reading.unregistered_visible
    if unregistered is None:
        unregistered = not worklist.sites.names()
    return ReadScope(frozenset(worklist.sites.readable_by(user.name, today)), unregistered)
