"""`triage demo` lets only its synthetic-data models raise priority, and only in its own server."""

from __future__ import annotations

from triage.cli import UNVALIDATED_ENV, synthetic_model_names
from triage.config import Settings


def test_the_demo_names_the_installed_synthetic_models_only() -> None:
    settings = Settings()
    assert synthetic_model_names(settings) == ["xr-chest-pneumothorax"]  # ct-head-ich is real: not listed
    # The name the demo sets is the setting a site would set (read back through the settings model).
    assert UNVALIDATED_ENV == "TRIAGE_PRIORITY__UNVALIDATED_MODELS_MAY_RAISE"


def test_a_site_service_lets_no_synthetic_model_raise_priority_by_default(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv(UNVALIDATED_ENV, raising=False)
    assert Settings().priority.unvalidated_models_may_raise == []
