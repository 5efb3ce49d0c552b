"""What each reader may see of a study's AI results: radiologists never see findings of models in shadow.

A shadow model runs on live traffic so that admins and ML engineers can compare it with the active one; its
findings must not change what a radiologist reads (STYLE: a model not validated for a site never raises
priority there, and its flags must not colour a read either). Admins and service accounts (the ML engineer's
scripts) see them, each marked `shadow: true`. Shadow findings are stored after the active ones, so the index of
every finding a radiologist sees is the same in both views (feedback and previews name findings by index).
"""

from __future__ import annotations

from typing import TypeVar

from triage.worklist.accounts import Role, User
from triage.worklist.repository import WorklistItem

Item = TypeVar("Item", bound=WorklistItem)


def sees_shadow(user: User) -> bool:
    """Whether `user` may see shadow findings: admins and service accounts, not radiologists."""
    return user.role in (Role.ADMIN, Role.SERVICE)


def for_reader(item: Item, user: User) -> Item:
    """`item` as `user` may see it: without shadow findings for a radiologist."""
    if sees_shadow(user) or not any(f.shadow for f in item.findings):
        return item
    return item.model_copy(update={"findings": [f for f in item.findings if not f.shadow]})
