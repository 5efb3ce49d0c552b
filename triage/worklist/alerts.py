"""Critical alerts: when an AI finding makes a study stat, each contact of its site is told once (through the
outbox), and the escalation contacts if no radiologist claims it in time. Contacts come from the site record, else
from the service's `TRIAGE_ALERTS__*` settings."""

from __future__ import annotations

from dataclasses import dataclass

from triage.config import AlertSettings
from triage.worklist.sites import Site

WEBHOOK = "webhook"
EMAIL = "email"
ALERT = "critical-alert"
ESCALATION = "critical-alert-escalation"


@dataclass(frozen=True)
class AlertContacts:
    """Who is told: (channel, destination) pairs, first and on escalation, and after how long unclaimed."""

    first: tuple[tuple[str, str], ...]
    escalation: tuple[tuple[str, str], ...]
    escalate_after_min: float


def contacts_for(site: Site | None, default: AlertSettings) -> AlertContacts:
    """A site's own contacts where it names any, else the service's."""
    own = site.alerts if site is not None else None
    webhooks, emails = default.webhooks, default.emails
    up_webhooks, up_emails = default.escalation_webhooks, default.escalation_emails
    after = default.escalate_after_min
    if own is not None:
        if own.webhooks or own.emails:
            webhooks, emails = own.webhooks, own.emails
        if own.escalation_webhooks or own.escalation_emails:
            up_webhooks, up_emails = own.escalation_webhooks, own.escalation_emails
        after = own.escalate_after_min or after
    first = tuple((WEBHOOK, u) for u in webhooks) + tuple((EMAIL, e) for e in emails)
    escalation = tuple((WEBHOOK, u) for u in up_webhooks) + tuple((EMAIL, e) for e in up_emails)
    return AlertContacts(first, escalation, after)
