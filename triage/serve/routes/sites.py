"""/api/v1/sites: client hospitals (admins change them; every change audited) and radiologists' privileges."""

from __future__ import annotations

from datetime import date
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel

from triage.domain import utcnow
from triage.serve.deps import AccountsDep, Admin, CurrentUser, ReadingDep, WorklistDep
from triage.worklist.accounts import Role
from triage.worklist.sites import Privilege, Site, parse_site

router = APIRouter(tags=["sites"])


class SiteChange(BaseModel):
    """The outcome of a change: the record, and how many open studies were recognised anew or rescored."""

    site: Site | None
    studies_recognised: int
    studies_rescored: int


class PrivilegeIn(BaseModel):
    until: date | None = None


class PrivilegeOut(BaseModel):
    username: str
    site: str
    until: date | None
    valid_today: bool
    granted_by: str


def _out(p: Privilege) -> PrivilegeOut:
    return PrivilegeOut(
        username=p.username,
        site=p.site,
        until=p.until,
        valid_today=p.valid_on(utcnow().date()),
        granted_by=p.granted_by,
    )


@router.get(
    "/sites",
    response_model=list[Site],
    summary="The client hospitals and their rules (admins: every record; others: name and time zone of the sites"
    " they may read)",
)
def list_sites(worklist: WorklistDep, user: CurrentUser, reading: ReadingDep) -> list[Site]:
    sites = worklist.sites.all()
    if user.role == Role.ADMIN:
        return sites
    # Another client's contacts, PACS and webhooks are not for readers or machines: names and clocks only.
    allowed = None if reading.scope is None else reading.scope.sites
    return [Site(name=s.name, time_zone=s.time_zone) for s in sites if allowed is None or s.name in allowed]


@router.get("/sites/{name}", response_model=Site, summary="One client hospital (admins)")
def get_site(name: str, worklist: WorklistDep, user: Admin) -> Site:
    return worklist.sites.get(name)


@router.post("/sites", response_model=SiteChange, status_code=201, summary="Register a client hospital (admins)")
def add_site(body: dict[str, Any], worklist: WorklistDep, user: Admin) -> SiteChange:
    site = parse_site(body)
    moved, rescored = worklist.save_site(site, user.name, utcnow(), create=True)
    return SiteChange(site=site, studies_recognised=moved, studies_rescored=rescored)


@router.patch("/sites/{name}", response_model=SiteChange, summary="Change some of a site's rules (admins)")
def change_site(name: str, body: dict[str, Any], worklist: WorklistDep, user: Admin) -> SiteChange:
    site, moved, rescored = worklist.update_site(name, body, user.name, utcnow())
    return SiteChange(site=site, studies_recognised=moved, studies_rescored=rescored)


@router.delete("/sites/{name}", response_model=SiteChange, summary="Remove a site and its privileges (admins)")
def remove_site(name: str, worklist: WorklistDep, user: Admin) -> SiteChange:
    moved, rescored = worklist.remove_site(name, user.name, utcnow())
    return SiteChange(site=None, studies_recognised=moved, studies_rescored=rescored)


@router.get("/privileges", response_model=list[PrivilegeOut], summary="Who may read which site (admins: all)")
def privileges(worklist: WorklistDep, user: CurrentUser) -> list[PrivilegeOut]:
    mine = None if user.role == Role.ADMIN else user.name
    return [_out(p) for p in worklist.sites.privileges(mine)]


@router.put(
    "/users/{username}/privileges/{site}",
    response_model=PrivilegeOut,
    summary="Let a radiologist read a site until a date (admins)",
)
def grant(
    username: str, site: str, body: PrivilegeIn, worklist: WorklistDep, accounts: AccountsDep, user: Admin
) -> PrivilegeOut:
    accounts.get_user(username)  # 404 for no such user
    return _out(worklist.sites.grant(username, site, body.until, user.name, utcnow()))


@router.delete("/users/{username}/privileges/{site}", status_code=204, summary="Withdraw a privilege (admins)")
def revoke(username: str, site: str, worklist: WorklistDep, user: Admin) -> Response:
    worklist.sites.revoke(username, site, user.name, utcnow())
    return Response(status_code=204)
