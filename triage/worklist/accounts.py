"""Users, API tokens, sign-in sessions, the audit log and radiologists' feedback on AI findings.

Secrets are never stored: passwords as argon2id hashes (argon2-cffi), session and API tokens as SHA-256 digests
(they are 256-bit random values, so a slow hash adds nothing). Nothing here holds patient names or birth dates:
the audit log and the feedback name users, studies (by Study Instance UID) and models.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import (
    JSON,
    Boolean,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from triage.config import Settings
from triage.errors import ConflictError, NotFoundError, TriageError
from triage.worklist.db import WRITE_OPTION, create_engine_for, migrate
from triage.worklist.tables import UID_LEN, Base, UTCDateTime

log = logging.getLogger(__name__)

# Environment variable holding the first admin's password (otherwise one is generated and printed once).
ADMIN_NAME = "admin"
# Sessions end this long after sign-in, whatever the activity: a night shift fits in it.
DEFAULT_SESSION_TTL = timedelta(hours=12)
MIN_PASSWORD_LEN = 8
TOKEN_PREFIX = "trg_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")

_hasher = PasswordHasher()
# Verified against when the user does not exist, so an unknown name costs as much time as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class Role(StrEnum):
    """What a user may do: radiologists read and claim, admins also manage users, service accounts are machines."""

    RADIOLOGIST = "radiologist"
    ADMIN = "admin"
    SERVICE = "service"

    @classmethod
    def parse(cls, value: str) -> Role:
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise InvalidAccountError(f"unknown role {value!r}; valid: {[r.value for r in cls]}") from None


class Verdict(StrEnum):
    """A radiologist's feedback on one AI finding."""

    AGREE = "agree"
    DISAGREE = "disagree"  # the AI was wrong: a false positive when flagged, a false negative when not
    MISSED = "missed"  # a finding the AI did not report at all

    @classmethod
    def parse(cls, value: str) -> Verdict:
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise InvalidAccountError(f"unknown feedback verdict {value!r}; valid: {[v.value for v in cls]}") from None


class InvalidAccountError(TriageError):
    """A user name, role, password or feedback value that cannot be accepted as given."""


# ---------------------------------------------------------------------------------------------------- tables
class UserRow(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    # None for service accounts: they authenticate with API tokens only.
    password_hash: Mapped[str | None] = mapped_column(Text, nullable=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ApiTokenRow(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters of the token, to tell tokens apart in listings without revealing them.
    hint: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class SessionRow(Base):
    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    # Per-session CSRF token: state-changing requests made with the session cookie must echo it.
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class AuditRow(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    # A user name (kept as text so the trail survives a user being disabled), never a patient's.
    user_name: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32), index=True)
    study_uid: Mapped[str | None] = mapped_column(String(UID_LEN), nullable=True, index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class FeedbackRow(Base):
    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    user_name: Mapped[str] = mapped_column(String(64))
    study_uid: Mapped[str] = mapped_column(String(UID_LEN), index=True)
    series_uid: Mapped[str] = mapped_column(String(UID_LEN), default="")
    label: Mapped[str] = mapped_column(Text)
    verdict: Mapped[str] = mapped_column(String(16))
    # What the AI said about `label` when the radiologist gave the feedback (None for "missed").
    ai_flagged: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    ai_probability: Mapped[float | None] = mapped_column(Float, nullable=True)
    model: Mapped[str] = mapped_column(Text, default="")
    model_version: Mapped[str] = mapped_column(Text, default="")
    comment: Mapped[str] = mapped_column(Text, default="")


class SignInFailureRow(Base):
    """One failed sign-in for a user name: what the shared sign-in throttle counts."""

    __tablename__ = "sign_in_failures"
    __table_args__ = (Index("ix_sign_in_failures_name_at", "name", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # The user name as typed, lower-cased (names compare case-insensitively); a user's name, never a patient's.
    name: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


# ---------------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class User:
    """Who is acting: a name and a role (plus account facts for listings)."""

    name: str
    role: Role
    disabled: bool = False
    created_at: datetime | None = None
    last_login_at: datetime | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN

    @property
    def is_human(self) -> bool:
        return self.role in (Role.RADIOLOGIST, Role.ADMIN)


@dataclass(frozen=True)
class SignIn:
    """A new session: the cookie value (shown once, stored hashed) and its CSRF token."""

    token: str
    csrf_token: str
    expires_at: datetime
    user: User


@dataclass(frozen=True)
class AuditEntry:
    at: datetime
    user: str
    action: str
    study_uid: str | None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FeedbackEntry:
    at: datetime
    user: str
    study_uid: str
    series_uid: str
    label: str
    verdict: Verdict
    ai_flagged: bool | None
    ai_probability: float | None
    model: str
    model_version: str
    comment: str

    @property
    def truth(self) -> int:
        """The radiologist's label for `label` on this series: 1 present, 0 absent.

        agree keeps the AI's call, disagree reverses it (a flagged finding becomes a false positive), missed says
        the finding is present although the AI did not report it.
        """
        if self.verdict == Verdict.MISSED:
            return 1
        flagged = bool(self.ai_flagged)
        return int(flagged) if self.verdict == Verdict.AGREE else int(not flagged)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _user(row: UserRow) -> User:
    return User(row.name, Role(row.role), row.disabled, row.created_at, row.last_login_at)


def check_name(name: str) -> str:
    """Raises InvalidAccountError unless `name` is 1-64 letters, digits, '.', '_', '@' or '-'."""
    if not NAME_PATTERN.match(name or ""):
        raise InvalidAccountError(
            f"invalid user name {name!r}: use 1-64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LEN:
        raise InvalidAccountError(f"password too short ({len(password)} characters); use at least {MIN_PASSWORD_LEN}")
    return password


class Accounts:
    """Users, tokens, sessions, audit log and feedback in the worklist database.

    Args:
        engine: an engine from `triage.worklist.db.create_engine_for`, migrated to head.
        session_ttl: how long a sign-in lasts.
    """

    def __init__(self, engine: Engine, session_ttl: timedelta = DEFAULT_SESSION_TTL) -> None:
        self.engine = engine
        self.session_ttl = session_ttl

    @contextmanager
    def _session(self, write: bool = False) -> Iterator[Session]:
        engine = self.engine.execution_options(**{WRITE_OPTION: True}) if write else self.engine
        with Session(engine, expire_on_commit=False) as session, session.begin():
            yield session

    def _row(self, session: Session, name: str) -> UserRow:
        row = session.scalar(select(UserRow).where(UserRow.name == name))
        if row is None:
            raise NotFoundError(f"no user named {name!r}")
        return row

    # ------------------------------------------------------------------------------------------------ users
    def add_user(self, name: str, role: Role | str, password: str | None, now: datetime) -> tuple[User, str]:
        """Create a user. People get a password (generated when None); service accounts get an API token.

        Returns:
            The user and the secret to hand over once: the password, or for role service the API token.

        Raises:
            InvalidAccountError: bad name, role or a password shorter than 8 characters.
            ConflictError: the name is taken.
        """
        check_name(name)
        role = Role.parse(role)
        if role == Role.SERVICE:
            if password is not None:
                raise InvalidAccountError("service accounts sign in with API tokens, not passwords; omit the password")
            secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
            password_hash = None
        else:
            secret = check_password(password) if password is not None else secrets.token_urlsafe(12)
            password_hash = _hasher.hash(secret)
        try:
            with self._session(write=True) as session:
                row = UserRow(name=name, role=role.value, password_hash=password_hash, disabled=False, created_at=now)
                session.add(row)
                session.flush()
                if role == Role.SERVICE:
                    session.add(self._token_row(row.id, secret, now))
        except IntegrityError as exc:
            raise ConflictError(f"a user named {name!r} already exists") from exc
        log.info("user %s added with role %s", name, role)
        return User(name, role, False, now, None), secret

    def list_users(self) -> list[User]:
        with self._session() as session:
            return [_user(r) for r in session.scalars(select(UserRow).order_by(UserRow.name))]

    def get_user(self, name: str) -> User:
        with self._session() as session:
            return _user(self._row(session, name))

    def set_disabled(self, name: str, disabled: bool = True) -> User:
        """Disable (or re-enable) a user; disabling ends their sessions and revokes their tokens at once."""
        with self._session(write=True) as session:
            row = self._row(session, name)
            row.disabled = disabled
            if disabled:
                session.execute(delete(SessionRow).where(SessionRow.user_id == row.id))
                session.execute(update(ApiTokenRow).where(ApiTokenRow.user_id == row.id).values(revoked=True))
            user = _user(row)
        log.info("user %s %s", name, "disabled" if disabled else "enabled")
        return user

    def set_password(self, name: str, password: str | None) -> str:
        """Set a person's password (generated when None) and end their sessions; returns the password."""
        secret = check_password(password) if password is not None else secrets.token_urlsafe(12)
        with self._session(write=True) as session:
            row = self._row(session, name)
            if row.role == Role.SERVICE:
                raise InvalidAccountError(f"{name!r} is a service account; issue it a new token instead")
            row.password_hash = _hasher.hash(secret)
            session.execute(delete(SessionRow).where(SessionRow.user_id == row.id))
        return secret

    def verify_password(self, name: str, password: str, now: datetime) -> User | None:
        """The user when `name` exists, is enabled, is a person and `password` matches; otherwise None."""
        with self._session(write=True) as session:
            row = session.scalar(select(UserRow).where(UserRow.name == name))
            stored = row.password_hash if row is not None and row.password_hash else _DUMMY_HASH
            try:
                _hasher.verify(stored, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return None
            if row is None or row.disabled or not row.password_hash:
                return None
            if _hasher.check_needs_rehash(row.password_hash):
                row.password_hash = _hasher.hash(password)
            row.last_login_at = now
            return _user(row)

    def ensure_admin(self, now: datetime, password: str | None = None) -> str | None:
        """First start: create `admin` when no admin account exists.

        Args:
            password: the admin's password (from TRIAGE_ADMIN_PASSWORD); None generates one.

        Returns:
            The generated password, to be shown once; None when an admin existed or the password was given.
        """
        with self._session() as session:
            exists = session.scalar(select(func.count()).select_from(UserRow).where(UserRow.role == Role.ADMIN))
        if exists:
            return None
        try:
            _, secret = self.add_user(ADMIN_NAME, Role.ADMIN, password, now)
        except ConflictError:
            return None  # another process created it first, or a non-admin took the name
        return None if password is not None else secret

    # ------------------------------------------------------------------------------------------------ tokens
    @staticmethod
    def _token_row(user_id: int, token: str, now: datetime) -> ApiTokenRow:
        return ApiTokenRow(
            user_id=user_id,
            token_sha256=_digest(token),
            hint=token[:8],
            created_at=now,
            last_used_at=None,
            revoked=False,
        )

    def issue_token(self, name: str, now: datetime) -> str:
        """A new API token for a service account (its earlier tokens stay valid until revoked)."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._session(write=True) as session:
            row = self._row(session, name)
            if row.role != Role.SERVICE:
                raise InvalidAccountError(f"{name!r} has role {row.role}; API tokens are for service accounts")
            session.add(self._token_row(row.id, token, now))
        return token

    def user_for_token(self, token: str, now: datetime) -> User | None:
        """The enabled service account holding this unrevoked token, else None."""
        if not token:
            return None
        with self._session() as session:
            found = session.execute(
                select(UserRow, ApiTokenRow)
                .join(ApiTokenRow, ApiTokenRow.user_id == UserRow.id)
                .where(ApiTokenRow.token_sha256 == _digest(token))
            ).first()
        if found is None:
            return None
        row, token_row = found
        if row.disabled or token_row.revoked:
            return None
        return _user(row)

    # ------------------------------------------------------------------------------------------------ sessions
    def start_session(self, user: User, now: datetime) -> SignIn:
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        expires = now + self.session_ttl
        with self._session(write=True) as session:
            row = self._row(session, user.name)
            session.add(
                SessionRow(
                    user_id=row.id, token_sha256=_digest(token), csrf_token=csrf, created_at=now, expires_at=expires
                )
            )
            # Housekeeping: expired sessions are useless; drop them as new ones start.
            session.execute(delete(SessionRow).where(SessionRow.expires_at < now))
        return SignIn(token, csrf, expires, user)

    def session_user(self, token: str, now: datetime) -> tuple[User, str] | None:
        """The enabled user and CSRF token of an unexpired session, else None."""
        if not token:
            return None
        with self._session() as session:
            found = session.execute(
                select(UserRow, SessionRow)
                .join(SessionRow, SessionRow.user_id == UserRow.id)
                .where(SessionRow.token_sha256 == _digest(token))
            ).first()
        if found is None:
            return None
        row, session_row = found
        if row.disabled or session_row.expires_at <= now:
            return None
        return _user(row), session_row.csrf_token

    def end_session(self, token: str) -> None:
        with self._session(write=True) as session:
            session.execute(delete(SessionRow).where(SessionRow.token_sha256 == _digest(token)))

    def sign_in_throttle(
        self, max_failures: int = 5, window_s: float = 900.0, lockout_s: float = 60.0
    ) -> SharedSignInThrottle:
        """The sign-in throttle shared by every process on this database."""
        return SharedSignInThrottle(self.engine, max_failures, window_s, lockout_s)

    # ------------------------------------------------------------------------------------------------ audit
    def audit(
        self, user: str, action: str, now: datetime, study_uid: str | None = None, detail: dict[str, Any] | None = None
    ) -> None:
        """Append one entry: who did what, when, to which study."""
        with self._session(write=True) as session:
            session.add(AuditRow(at=now, user_name=user[:64], action=action, study_uid=study_uid, detail=detail or {}))

    def audit_entries(
        self,
        limit: int = 200,
        offset: int = 0,
        user: str | None = None,
        action: str | None = None,
        study_uid: str | None = None,
    ) -> list[AuditEntry]:
        """Newest first."""
        query = select(AuditRow).order_by(AuditRow.at.desc(), AuditRow.id.desc())
        if user:
            query = query.where(AuditRow.user_name == user)
        if action:
            query = query.where(AuditRow.action == action)
        if study_uid:
            query = query.where(AuditRow.study_uid == study_uid)
        if limit:
            query = query.limit(limit).offset(offset)
        with self._session() as session:
            return [AuditEntry(r.at, r.user_name, r.action, r.study_uid, r.detail) for r in session.scalars(query)]

    # ------------------------------------------------------------------------------------------------ feedback
    def add_feedback(
        self,
        user: str,
        study_uid: str,
        label: str,
        verdict: Verdict | str,
        now: datetime,
        *,
        series_uid: str = "",
        ai_flagged: bool | None = None,
        ai_probability: float | None = None,
        model: str = "",
        model_version: str = "",
        comment: str = "",
    ) -> FeedbackEntry:
        verdict = Verdict.parse(verdict)
        label = (label or "").strip()
        if not label or len(label) > 64 or not re.match(r"^[A-Za-z0-9_ -]+$", label):
            raise InvalidAccountError(f"invalid finding label {label!r}: 1-64 letters, digits, spaces, '_' or '-'")
        if len(comment) > 2000:
            raise InvalidAccountError(f"comment too long ({len(comment)} characters); at most 2000")
        if verdict != Verdict.MISSED and ai_flagged is None:
            raise InvalidAccountError(f"feedback {verdict.value!r} needs the AI finding it refers to")
        entry = FeedbackEntry(
            now, user, study_uid, series_uid, label, verdict, ai_flagged, ai_probability, model, model_version, comment
        )
        with self._session(write=True) as session:
            session.add(
                FeedbackRow(
                    at=now,
                    user_name=user,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    label=label,
                    verdict=verdict.value,
                    ai_flagged=ai_flagged,
                    ai_probability=ai_probability,
                    model=model,
                    model_version=model_version,
                    comment=comment,
                )
            )
        return entry

    def feedback_entries(
        self, study_uid: str | None = None, model: str | None = None, label: str | None = None
    ) -> list[FeedbackEntry]:
        """Oldest first (a later entry on the same finding by the same user supersedes an earlier one)."""
        query = select(FeedbackRow).order_by(FeedbackRow.at, FeedbackRow.id)
        if study_uid:
            query = query.where(FeedbackRow.study_uid == study_uid)
        if model:
            query = query.where(FeedbackRow.model == model)
        if label:
            query = query.where(FeedbackRow.label == label)
        with self._session() as session:
            return [
                FeedbackEntry(
                    r.at,
                    r.user_name,
                    r.study_uid,
                    r.series_uid,
                    r.label,
                    Verdict(r.verdict),
                    r.ai_flagged,
                    r.ai_probability,
                    r.model,
                    r.model_version,
                    r.comment,
                )
                for r in session.scalars(query)
            ]


# ---------------------------------------------------------------------------------------------------- throttle
def _throttle_key(name: str) -> str:
    return name.strip().lower()[:64]


def _wall_clock(now: datetime | float | None) -> datetime:
    # The in-memory throttle took time.monotonic() seconds, which mean nothing in another process: anything
    # but an aware datetime reads this machine's UTC clock (replicas are expected to run NTP).
    if isinstance(now, datetime):
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError(f"naive datetime {now!r}; pass a timezone-aware UTC time")
        return now.astimezone(UTC)
    return datetime.now(UTC)


class SharedSignInThrottle:
    """Slows password guessing across every replica: after `max_failures` failed sign-ins for one user name
    within `window_s`, that name is refused for `lockout_s` without checking the password; a successful
    sign-in clears its failures. The failures live in the database (table `sign_in_failures`), so guesses
    spread over several API replicas count together. Names compare case-insensitively.

    Same methods as the in-memory `triage.serve.web.SignInThrottle`, with wall-clock UTC times.

    Args:
        engine: the accounts database, or a callable returning it (resolved on first use, so the throttle can
            be built before the database is opened).
        max_failures, window_s, lockout_s: as above.
    """

    def __init__(
        self,
        engine: Engine | Callable[[], Engine],
        max_failures: int = 5,
        window_s: float = 900.0,
        lockout_s: float = 60.0,
    ) -> None:
        if max_failures < 1:
            raise InvalidAccountError(f"max_failures must be at least 1, not {max_failures}")
        self._engine = engine
        self.max_failures = max_failures
        self.window_s = window_s
        self.lockout_s = lockout_s

    @property
    def engine(self) -> Engine:
        return self._engine if isinstance(self._engine, Engine) else self._engine()

    @contextmanager
    def _session(self, write: bool = False) -> Iterator[Session]:
        engine = self.engine.execution_options(**{WRITE_OPTION: True}) if write else self.engine
        with Session(engine, expire_on_commit=False) as session, session.begin():
            yield session

    def wait_s(self, name: str, now: datetime | float | None = None) -> float:
        """Seconds until `name` may try again (0 when it may now)."""
        at = _wall_clock(now)
        with self._session() as session:
            recent = list(
                session.scalars(
                    select(SignInFailureRow.at)
                    .where(
                        SignInFailureRow.name == _throttle_key(name),
                        SignInFailureRow.at > at - timedelta(seconds=self.window_s),
                    )
                    .order_by(SignInFailureRow.at.desc())
                    .limit(self.max_failures)
                )
            )
        if len(recent) < self.max_failures:
            return 0.0
        return max(0.0, (recent[0] + timedelta(seconds=self.lockout_s) - at).total_seconds())

    def failed(self, name: str, now: datetime | float | None = None) -> None:
        """Count one failed sign-in for `name`."""
        at = _wall_clock(now)
        key = _throttle_key(name)
        with self._session(write=True) as session:
            session.add(SignInFailureRow(name=key, at=at))
        # Housekeeping in its own transaction, so that two replicas pruning at once can never cost the failure
        # just counted: failures outside the window count no more (for any name), and a name keeps only its
        # newest `max_failures`, so guessing cannot grow the table without bound.
        newest = (
            select(SignInFailureRow.id)
            .where(SignInFailureRow.name == key)
            .order_by(SignInFailureRow.at.desc(), SignInFailureRow.id.desc())
            .limit(self.max_failures)
        )
        try:
            with self._session(write=True) as session:
                session.execute(
                    delete(SignInFailureRow).where(SignInFailureRow.at <= at - timedelta(seconds=self.window_s))
                )
                session.execute(
                    delete(SignInFailureRow).where(SignInFailureRow.name == key, SignInFailureRow.id.not_in(newest))
                )
        except DBAPIError as exc:  # a deadlock or serialisation failure with another replica: prune next time
            log.info("sign-in failures not pruned this time (%s)", type(exc).__name__)

    def succeeded(self, name: str) -> None:
        """Forget the failures of `name` (it signed in)."""
        with self._session(write=True) as session:
            session.execute(delete(SignInFailureRow).where(SignInFailureRow.name == _throttle_key(name)))


# ---------------------------------------------------------------------------------------------------- CLI helpers
def open_accounts(settings: Settings) -> Accounts:
    """The accounts of the database under `settings` (migrated to head first)."""
    url = settings.resolved_database_url
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(url)
    return Accounts(create_engine_for(url), timedelta(hours=settings.session_ttl_h))


def _now() -> datetime:
    return datetime.now(UTC)


def add_user(settings: Settings, name: str, role: str, password: str | None = None) -> tuple[User, str]:
    """`triage users add NAME --role R [--password P]`: returns the user and its password or API token.

    For role service the secret is the API token (use it as `Authorization: Bearer TOKEN`); for a person it is
    the password given, or a generated one when `password` is None.
    """
    accounts = open_accounts(settings)
    try:
        return accounts.add_user(name, role, password, _now())
    finally:
        accounts.engine.dispose()


def list_users(settings: Settings) -> list[User]:
    """`triage users list`."""
    accounts = open_accounts(settings)
    try:
        return accounts.list_users()
    finally:
        accounts.engine.dispose()


def disable_user(settings: Settings, name: str) -> User:
    """`triage users disable NAME`: ends the user's sessions and revokes their API tokens."""
    accounts = open_accounts(settings)
    try:
        return accounts.set_disabled(name, True)
    finally:
        accounts.engine.dispose()


def issue_token(settings: Settings, name: str) -> str:
    """`triage users token NAME`: a further API token for an existing service account."""
    accounts = open_accounts(settings)
    try:
        return accounts.issue_token(name, _now())
    finally:
        accounts.engine.dispose()


def reset_password(settings: Settings, name: str, password: str | None = None) -> str:
    """`triage users password NAME [--password P]`: sets (or generates) a person's password; returns it."""
    accounts = open_accounts(settings)
    try:
        return accounts.set_password(name, password)
    finally:
        accounts.engine.dispose()


def feedback_label_rows(
    entries: Sequence[FeedbackEntry], image_for: Any, model: str | None = None
) -> list[dict[str, Any]]:
    """Rows of the training label CSV: the latest verdict per (user-independent) series and label.

    Args:
        entries: feedback, oldest first.
        image_for: callable (study_uid, series_uid) -> path of the stored DICOM file or series folder, or None
            when the images are gone (such rows are left out).
        model: keep only feedback on this model's findings (missed findings carry the model they were missed by).
    """
    latest: dict[tuple[str, str, str], FeedbackEntry] = {}
    for entry in entries:
        if model and entry.model != model:
            continue
        latest[(entry.study_uid, entry.series_uid, entry.label)] = entry
    rows = []
    for entry in latest.values():
        image = image_for(entry.study_uid, entry.series_uid)
        if not image:
            continue
        rows.append(
            {
                "image": image,
                "label": entry.truth,
                "finding": entry.label,
                "verdict": entry.verdict.value,
                "model": entry.model,
                "model_version": entry.model_version,
                "study_uid": entry.study_uid,
                "series_uid": entry.series_uid,
                "user": entry.user,
                "at": entry.at.isoformat(),
            }
        )
    return rows


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
