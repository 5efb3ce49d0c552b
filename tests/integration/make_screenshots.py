"""Regenerate docs/screenshots/worklist.png and study.png from a real run (not a test; run it by hand).

    .venv/bin/python tests/integration/make_screenshots.py [--out docs/screenshots] [--runner inprocess|ray]

It starts `triage serve` on a temporary data directory, sends with dcmtk's storescu the real head CT from
tests/data/ct-head-ge twice (once as it is, once with a synthetic haemorrhage inserted by
triage.training.synth_ich) and three synthetic chest X-rays, waits for the analyses, signs in as a radiologist in
headless chromium and saves the worklist and the study view of the flagged head CT.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.integration.conftest import HEAD_CT, promote_for_tests, start_server, stop_server  # noqa: E402
from tests.integration.test_browser import add_radiologist, chrome, sign_in, wait_live, write_xray  # noqa: E402

READER = ("dr-night", "reader-password-1")
XRAYS = ((101, True), (103, True), (200, False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    parser.add_argument("--runner", default="inprocess", help="inprocess (default) or ray")
    parser.add_argument("--ich-volume-ml", type=float, default=20.0)
    args = parser.parse_args(argv)

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from triage.training.synth_ich import insert_haemorrhage

    work = Path(tempfile.mkdtemp(prefix="triage-screens-"))
    bleed = insert_haemorrhage(HEAD_CT, work / "ct-ich", volume_ml=args.ich_volume_ml, seed=3)
    print(f"inserted {bleed.volume_ml:.1f} mL on slices {bleed.slices}", flush=True)
    for seed, positive in XRAYS:
        write_xray(work / "xr", seed, positive)
    # As in `triage demo`: the synthetic X-ray model is activated for these synthetic studies' site.
    promote_for_tests(work / "data", "xr-chest-pneumothorax")
    server = start_server(work / "data", runner=args.runner)
    try:
        add_radiologist(server, *READER)
        # The flagged CT arrives first: among studies of one level the longest-waiting comes first.
        for folder in (work / "ct-ich", work / "xr", HEAD_CT):
            server.storescu(folder)
            time.sleep(1)
        items = server.wait_for(
            lambda items: (
                items
                if len(items) == 5 and all(i["ai_status"] in ("done", "failed", "not-applicable") for i in items)
                else None
            ),
            timeout_s=1200,
            what="all five studies analysed",
        )
        for item in items:
            flags = [(f["label"], f["probability"], f["flagged"]) for f in item["findings"]]
            print(item["priority"]["level"], item["modality"], item["accession_number"], flags, flush=True)
        top = items[0]
        assert top["modality"] == "CT" and any(
            f["flagged"] and f["label"] == "intracranial_haemorrhage" for f in top["findings"]
        ), "the flagged head CT should be at the top"

        args.out.mkdir(parents=True, exist_ok=True)
        profile = Path(tempfile.mkdtemp(prefix="triage-chromium-"))
        driver = chrome(profile, width=1440, height=860)
        try:
            sign_in(driver, server.url, *READER)
            wait_live(driver)
            time.sleep(1)
            driver.save_screenshot(str(args.out / "worklist.png"))
            driver.find_element(By.CSS_SELECTOR, f'tr[data-study="{top["study_uid"]}"] a.study-link').click()
            WebDriverWait(driver, 60).until(
                lambda d: d.execute_script(
                    "const i = document.getElementById('preview-0'); return i && i.complete && i.naturalWidth"
                )
            )
            driver.set_window_size(1440, 1500)
            time.sleep(0.5)
            driver.save_screenshot(str(args.out / "study.png"))
        finally:
            driver.quit()
        print(f"wrote {args.out / 'worklist.png'} and {args.out / 'study.png'}")
    finally:
        stop_server(server)


if __name__ == "__main__":
    main()
