"""/docs in a real browser against a real `triage serve`: Swagger UI renders from triage's own files under its CSP,
and the browser fetches nothing from another host (a hospital network is often offline)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Server, start_server, stop_server
from tests.integration.test_browser import chrome

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "docs-admin-password-1"


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("triage-docs") / "data"
    server = start_server(data_dir, {"TRIAGE_ADMIN_PASSWORD": ADMIN_PASSWORD}, runner="inprocess")
    try:
        yield server
    finally:
        stop_server(server)


def test_swagger_ui_renders_from_local_files_only(docs_server: Server, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chrome(tmp_path / "chromium")
    try:
        driver.get(docs_server.url + "/login?next=/docs")
        driver.find_element(By.NAME, "username").send_keys("admin")
        driver.find_element(By.NAME, "password").send_keys(ADMIN_PASSWORD)
        driver.find_element(By.ID, "signin").click()
        WebDriverWait(driver, 60).until(ec.url_contains("/docs"))
        # Rendered by Swagger UI's script (blocked scripts would leave the page blank): the title and operations.
        title = WebDriverWait(driver, 60).until(
            ec.visibility_of_element_located((By.CSS_SELECTOR, ".swagger-ui .info .title"))
        )
        assert title.text.startswith("triage")
        WebDriverWait(driver, 60).until(
            ec.presence_of_element_located((By.CSS_SELECTOR, ".swagger-ui .opblock-summary-path"))
        )
        paths = {e.get_attribute("data-path") for e in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        assert "/api/v1/worklist" in paths
        resources = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name).concat([location.href])"
        )
        foreign = [url for url in resources if not url.startswith(docs_server.url)]
        assert not foreign, f"/docs fetched from other hosts: {foreign}"
        assert any(url.endswith("/static/swagger-ui/swagger-ui-bundle.js") for url in resources), resources
    finally:
        driver.quit()
