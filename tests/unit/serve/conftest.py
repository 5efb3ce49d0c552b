"""Fixtures for the serve tests: see serve_site.py."""

from serve_site import settings, site  # noqa: F401 - fixtures
