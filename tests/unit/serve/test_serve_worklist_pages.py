"""The worklist API pages in the database order (limit, offset), and the page's filter menus list every study's
modality and site without loading the worklist twice."""

from __future__ import annotations

from fastapi.testclient import TestClient
from serve_site import Site, ich_finding, utcnow

from tests.dicom_factory import make_radiograph


def add_xray(site: Site, accession: str, seed: int, institution: str = "South") -> str:
    ds = make_radiograph("DX", 64, 64, accession_number=accession, seed=seed)
    ds.InstitutionName = institution
    site.service.accept(ds, "XR_ROOM")
    return str(ds.StudyInstanceUID)


def uids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["study_uid"] for item in response.json()]


def test_worklist_api_pages_through_the_same_order(site: Site) -> None:
    xrays = [add_xray(site, f"ACC-XR-{n}", n) for n in range(5)]
    ct, datasets = site.add_ct("ACC-CT-1")
    site.finish(ct, [ich_finding(str(datasets[2].SOPInstanceUID), str(datasets[2].SeriesInstanceUID), None)])
    _, token = site.accounts.add_user("pacs-bridge", "service", None, utcnow())
    client, auth = TestClient(site.client.app), {"Authorization": f"Bearer {token}"}

    everything = uids(client.get("/api/v1/worklist", headers=auth))
    assert everything[0] == ct  # the flagged head CT is stat, first
    assert sorted(everything) == sorted([ct, *xrays])
    pages = [uids(client.get("/api/v1/worklist", params={"limit": 2, "offset": k}, headers=auth)) for k in (0, 2, 4)]
    assert [len(page) for page in pages] == [2, 2, 2]
    assert [uid for page in pages for uid in page] == everything
    assert uids(client.get("/api/v1/worklist", params={"limit": 2, "offset": 6}, headers=auth)) == []
    assert uids(client.get("/api/v1/worklist", params={"level": "stat", "limit": 1}, headers=auth)) == [ct]
    assert client.get("/api/v1/worklist", params={"limit": 0}, headers=auth).status_code == 422
    assert client.get("/api/v1/worklist", params={"offset": -1}, headers=auth).status_code == 422


def test_worklist_page_menus_list_every_modality_and_site(site: Site) -> None:
    add_xray(site, "ACC-XR-1", 1)
    site.add_ct("ACC-CT-1")
    site.sign_in()
    # Filtered to DX, the menus still offer CT and every site, as before.
    page = site.client.get("/worklist", params={"modality": "DX"})
    assert page.status_code == 200
    assert '<option value="CT">CT</option>' in page.text
    assert '<option value="DX" selected>DX</option>' in page.text
    assert '<option value="South">South</option>' in page.text


def test_live_refresh_sends_only_the_changed_rows_with_the_page_order(site: Site) -> None:
    import re

    xrays = [add_xray(site, f"ACC-XR-{n}", n) for n in range(3)]
    ct, datasets = site.add_ct("ACC-CT-1")
    site.sign_in()
    site.finish(ct, [ich_finding(str(datasets[2].SOPInstanceUID), str(datasets[2].SeriesInstanceUID), None)])

    response = site.client.get("/worklist/rows", params={"changed": ct})
    assert response.status_code == 200
    assert re.findall(r'<tr data-study="([^"]+)"', response.text) == [ct]  # only the row that changed
    order = response.headers["X-Worklist-Order"].split()
    assert order[0] == ct and sorted(order) == sorted([ct, *xrays])  # where every row of the page goes now

    whole = site.client.get("/worklist/rows")
    assert re.findall(r'<tr data-study="([^"]+)"', whole.text) == order
    assert "X-Worklist-Order" not in whole.headers
