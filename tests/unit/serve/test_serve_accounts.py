"""Accounts: users, passwords (argon2), API tokens, sessions with expiry, audit log and feedback labels."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from triage.config import Settings
from triage.errors import ConflictError, NotFoundError
from triage.worklist.accounts import (
    Accounts,
    FeedbackEntry,
    InvalidAccountError,
    Role,
    Verdict,
    add_user,
    disable_user,
    feedback_label_rows,
    issue_token,
    list_users,
    open_accounts,
    reset_password,
)
from triage.worklist.db import create_engine_for, migrate

T0 = datetime(2026, 1, 5, 22, 0, tzinfo=UTC)


POSTGRES_URL = os.environ.get("TRIAGE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(params=["sqlite", "postgres"])
def accounts(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Accounts]:
    """The accounts on a fresh SQLite file and on a fresh database of a real PostgreSQL server."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'accounts.db'}"
        migrate(url)
        engine = create_engine_for(url)
        yield Accounts(engine, session_ttl=timedelta(hours=12))
        engine.dispose()
        return
    psycopg = pytest.importorskip("psycopg")
    server = make_url(POSTGRES_URL).set(drivername="postgresql")
    admin_url = server.render_as_string(hide_password=False)
    name = "triage_accounts_" + uuid.uuid4().hex[:10]
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f"CREATE DATABASE {name}")
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL server answers at {server.render_as_string()}: {exc}")
    url = server.set(drivername="postgresql+psycopg", database=name)
    try:
        migrate(url)
        engine = create_engine_for(url)
        yield Accounts(engine, session_ttl=timedelta(hours=12))
        engine.dispose()
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_password_is_stored_as_argon2_and_verified(accounts: Accounts) -> None:
    user, secret = accounts.add_user("reader", "radiologist", "correct horse", T0)
    assert (user.name, user.role, secret) == ("reader", Role.RADIOLOGIST, "correct horse")
    with accounts.engine.connect() as conn:
        stored = conn.exec_driver_sql("SELECT password_hash FROM users WHERE name = 'reader'").scalar_one()
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
    assert accounts.verify_password("reader", "correct horse", T0) == accounts.get_user("reader")
    assert accounts.verify_password("reader", "wrong password", T0) is None
    assert accounts.verify_password("nobody", "correct horse", T0) is None
    assert accounts.get_user("reader").last_login_at == T0


def test_generated_password_when_none_given(accounts: Accounts) -> None:
    _, secret = accounts.add_user("reader", Role.RADIOLOGIST, None, T0)
    assert len(secret) >= 12
    assert accounts.verify_password("reader", secret, T0) is not None


@pytest.mark.parametrize(
    ("name", "role", "password", "quoted"),
    [
        ("bad name", "radiologist", "long enough", "'bad name'"),
        ("", "radiologist", "long enough", "''"),
        ("reader", "surgeon", "long enough", "'surgeon'"),
        ("reader", "radiologist", "short", "too short"),
        ("robot", "service", "a password", "service accounts"),
    ],
)
def test_bad_account_input_is_refused_quoting_the_value(
    accounts: Accounts, name: str, role: str, password: str, quoted: str
) -> None:
    with pytest.raises(InvalidAccountError, match=quoted):
        accounts.add_user(name, role, password, T0)


def test_duplicate_name_conflicts(accounts: Accounts) -> None:
    accounts.add_user("reader", "radiologist", "long enough", T0)
    with pytest.raises(ConflictError, match="'reader'"):
        accounts.add_user("reader", "admin", "long enough", T0)


def test_service_account_gets_a_token_stored_hashed(accounts: Accounts) -> None:
    user, token = accounts.add_user("pacs-bridge", "service", None, T0)
    assert user.role == Role.SERVICE and token.startswith("trg_")
    with accounts.engine.connect() as conn:
        digests = conn.exec_driver_sql("SELECT token_sha256 FROM api_tokens").scalars().all()
    assert token not in digests and len(digests) == 1
    assert accounts.user_for_token(token, T0) == accounts.get_user("pacs-bridge")
    assert accounts.user_for_token(token + "x", T0) is None
    assert accounts.verify_password("pacs-bridge", token, T0) is None  # tokens are not passwords
    second = accounts.issue_token("pacs-bridge", T0)
    assert accounts.user_for_token(second, T0) is not None and second != token


def test_tokens_are_only_for_service_accounts(accounts: Accounts) -> None:
    accounts.add_user("reader", "radiologist", "long enough", T0)
    with pytest.raises(InvalidAccountError, match="service accounts"):
        accounts.issue_token("reader", T0)


def test_sessions_expire(accounts: Accounts) -> None:
    user, _ = accounts.add_user("reader", "radiologist", "long enough", T0)
    sign_in = accounts.start_session(user, T0)
    assert accounts.session_user(sign_in.token, T0 + timedelta(hours=11, minutes=59)) == (user, sign_in.csrf_token)
    assert accounts.session_user(sign_in.token, T0 + timedelta(hours=12)) is None
    assert accounts.session_user("not-a-session", T0) is None


def test_sign_out_ends_the_session(accounts: Accounts) -> None:
    user, _ = accounts.add_user("reader", "radiologist", "long enough", T0)
    sign_in = accounts.start_session(user, T0)
    accounts.end_session(sign_in.token)
    assert accounts.session_user(sign_in.token, T0) is None


def test_disabling_ends_sessions_revokes_tokens_and_refuses_sign_in(accounts: Accounts) -> None:
    reader, _ = accounts.add_user("reader", "radiologist", "long enough", T0)
    _, token = accounts.add_user("robot", "service", None, T0)
    sign_in = accounts.start_session(reader, T0)
    accounts.set_disabled("reader")
    accounts.set_disabled("robot")
    assert accounts.session_user(sign_in.token, T0) is None
    assert accounts.verify_password("reader", "long enough", T0) is None
    assert accounts.user_for_token(token, T0) is None
    accounts.set_disabled("robot", False)
    assert accounts.user_for_token(token, T0) is None  # revoked tokens stay revoked
    with pytest.raises(NotFoundError, match="'ghost'"):
        accounts.set_disabled("ghost")


def test_new_password_ends_sessions(accounts: Accounts) -> None:
    reader, _ = accounts.add_user("reader", "radiologist", "long enough", T0)
    sign_in = accounts.start_session(reader, T0)
    accounts.set_password("reader", "another long one")
    assert accounts.session_user(sign_in.token, T0) is None
    assert accounts.verify_password("reader", "another long one", T0) is not None


def test_first_admin_is_created_once(accounts: Accounts) -> None:
    generated = accounts.ensure_admin(T0)
    assert generated and accounts.verify_password("admin", generated, T0).role == Role.ADMIN
    assert accounts.ensure_admin(T0) is None
    assert [u.name for u in accounts.list_users()] == ["admin"]


def test_first_admin_password_from_setting(accounts: Accounts) -> None:
    assert accounts.ensure_admin(T0, "from-the-environment") is None
    assert accounts.verify_password("admin", "from-the-environment", T0) is not None


def test_audit_log_newest_first_with_filters(accounts: Accounts) -> None:
    accounts.audit("reader", "view", T0, "1.2.3")
    accounts.audit("reader", "claim", T0 + timedelta(seconds=1), "1.2.3")
    accounts.audit("other", "view", T0 + timedelta(seconds=2), "1.2.4", {"page": "study"})
    assert [e.action for e in accounts.audit_entries()] == ["view", "claim", "view"]
    assert [e.study_uid for e in accounts.audit_entries(user="reader")] == ["1.2.3", "1.2.3"]
    assert accounts.audit_entries(study_uid="1.2.4")[0].detail == {"page": "study"}
    assert len(accounts.audit_entries(limit=1)) == 1


def _feedback(verdict: Verdict, flagged: bool | None) -> FeedbackEntry:
    return FeedbackEntry(T0, "reader", "1.2", "1.2.1", "pneumothorax", verdict, flagged, 0.8, "m", "1", "")


@pytest.mark.parametrize(
    ("verdict", "flagged", "truth"),
    [
        (Verdict.AGREE, True, 1),
        (Verdict.AGREE, False, 0),
        (Verdict.DISAGREE, True, 0),  # false positive
        (Verdict.DISAGREE, False, 1),  # false negative
        (Verdict.MISSED, None, 1),
    ],
)
def test_feedback_truth(verdict: Verdict, flagged: bool | None, truth: int) -> None:
    assert _feedback(verdict, flagged).truth == truth


def test_feedback_needs_a_finding_unless_missed(accounts: Accounts) -> None:
    with pytest.raises(InvalidAccountError, match="needs the AI finding"):
        accounts.add_feedback("reader", "1.2", "pneumothorax", "agree", T0)
    with pytest.raises(InvalidAccountError, match="'maybe'"):
        accounts.add_feedback("reader", "1.2", "pneumothorax", "maybe", T0)
    with pytest.raises(InvalidAccountError, match="invalid finding label"):
        accounts.add_feedback("reader", "1.2", "<script>", "missed", T0)
    entry = accounts.add_feedback("reader", "1.2", "pneumothorax", "missed", T0, model="m", model_version="1")
    assert accounts.feedback_entries("1.2") == [entry]


def test_label_rows_keep_the_latest_verdict_per_image_and_label(tmp_path: Path) -> None:
    image = tmp_path / "case.dcm"
    image.write_bytes(b"")
    entries = [_feedback(Verdict.AGREE, True), _feedback(Verdict.DISAGREE, True)]
    rows = feedback_label_rows(entries, lambda study, series: str(image))
    assert [(r["image"], r["label"], r["verdict"]) for r in rows] == [(str(image), 0, "disagree")]
    assert feedback_label_rows(entries, lambda study, series: None) == []
    assert feedback_label_rows(entries, lambda study, series: str(image), model="other") == []


def test_cli_functions_round_trip(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    user, password = add_user(settings, "reader", "radiologist", None)
    _, token = add_user(settings, "robot", "service")
    assert [(u.name, u.role.value) for u in list_users(settings)] == [("reader", "radiologist"), ("robot", "service")]
    accounts = open_accounts(settings)
    assert accounts.verify_password("reader", password, T0) is not None
    assert accounts.user_for_token(token, T0).name == "robot"
    assert accounts.user_for_token(issue_token(settings, "robot"), T0).name == "robot"
    new_password = reset_password(settings, "reader")
    assert accounts.verify_password("reader", new_password, T0) is not None
    assert disable_user(settings, "reader").disabled
    assert accounts.verify_password("reader", new_password, T0) is None
    assert user.name == "reader"
