"""The dependencies routes declare (FastAPI `Annotated` style): the service, its settings and accounts, and who
is asking with which role. Routes take these as parameters and never read `request.app.state` themselves."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from triage.config import Settings
from triage.domain import utcnow
from triage.errors import NotPermittedError
from triage.serve.auth import HUMAN_ROLES, accounts_of, current_user, require_reporter, require_roles
from triage.serve.service import TriageService
from triage.serve.visibility import scope_of
from triage.worklist.accounts import Accounts, Role, User
from triage.worklist.repository import ReadScope, Worklist


def get_service(request: Request) -> TriageService:
    service: TriageService = request.app.state.service
    return service


def get_settings(service: Annotated[TriageService, Depends(get_service)]) -> Settings:
    return service.settings


def get_worklist(service: Annotated[TriageService, Depends(get_service)]) -> Worklist:
    return service.worklist


Service = Annotated[TriageService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
WorklistDep = Annotated[Worklist, Depends(get_worklist)]
AccountsDep = Annotated[Accounts, Depends(accounts_of)]

CurrentUser = Annotated[User, Depends(current_user)]
Human = Annotated[User, Depends(require_roles(*HUMAN_ROLES, action="give feedback on AI findings"))]
# Claims are for people: a machine that claims a study takes it away from every radiologist.
Claimant = Annotated[User, Depends(require_roles(*HUMAN_ROLES, action="claim or release studies"))]
# People, and a service account only where the site lets its RIS bridge mark studies reported.
Reporter = Annotated[User, Depends(require_reporter)]
Admin = Annotated[User, Depends(require_roles(Role.ADMIN))]
Exporter = Annotated[User, Depends(require_roles(Role.ADMIN, Role.SERVICE))]


class Auditor:
    """Writes one audit entry for the current request's user (a dependency, so routes stay one-liners)."""

    def __init__(self, accounts: AccountsDep) -> None:
        self.accounts = accounts

    def __call__(self, user: User, action: str, study_uid: str | None = None, **detail: Any) -> None:
        self.accounts.audit(user.name, action, utcnow(), study_uid, detail)


Audit = Annotated[Auditor, Depends(Auditor)]


class Reading:
    """The current user's reading scope (the sites they may read now) and the check on one study, which audits
    a refusal (`access-denied`) before the 403 goes out."""

    def __init__(self, user: CurrentUser, service: Service, accounts: AccountsDep) -> None:
        self.user = user
        self.worklist = service.worklist
        self.accounts = accounts
        self.scope: ReadScope | None = scope_of(user, service.worklist, service.settings)

    def check(self, study_uid: str, action: str) -> None:
        """Raises: NotFoundError (404) for no such study; NotPermittedError (403, audited) outside the scope."""
        try:
            self.worklist.check_scope(study_uid, self.scope)
        except NotPermittedError as exc:
            self.accounts.audit(
                self.user.name, "access-denied", utcnow(), study_uid, {"attempted": action, "reason": str(exc)}
            )
            raise


ReadingDep = Annotated[Reading, Depends(Reading)]
