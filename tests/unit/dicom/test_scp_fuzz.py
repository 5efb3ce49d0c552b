"""Fuzzing the storage SCP over C-STORE with the deterministic corpus (tests/fuzz/corpus.py), pynetdicom as a
raw peer: every case is answered, no refusal says "try again later" (0xA7xx) for bad data, whatever is accepted
is a valid instance on disk, and afterwards the SCP still stores a valid instance.

The summary (cases tried, statuses by kind and by mutation family) is printed; run with `-s` to see it.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import pydicom
import pytest

from tests.dicom_factory import make_ct_series
from tests.dicom_peers import Receiver
from tests.fuzz.corpus import build_corpus, family
from tests.fuzz.cstore import RawStoreClient
from triage.dicom.status import describe_status, is_permanent_failure
from triage.dicom.store import validate_instance

SEED = 9


@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about every damaged value it reads
def test_fuzzed_c_store_cases_get_permanent_statuses_and_the_scp_keeps_storing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
):
    caplog.set_level(logging.WARNING, logger="triage")
    receiver = Receiver(tmp_path / "store")
    index, store, scp = receiver, receiver.store, receiver.scp
    scp.start()
    cases = build_corpus(SEED)
    statuses: dict[str, int | None] = {}
    invalid_stored: list[str] = []
    try:
        with RawStoreClient(scp.port, tmp_path / "send") as client:
            for name, data in cases:
                status = client.send(name, data)
                statuses[name] = status
                if status == 0x0000:
                    # Accepted: then what is on disk must be a valid instance (read back as any reader would).
                    newest = max(index.metas.values(), key=lambda m: (store.root / m.key).stat().st_mtime_ns)
                    try:
                        validate_instance(pydicom.dcmread(store.files.open(newest.key)))
                    except Exception as exc:  # noqa: BLE001 - collected and reported below
                        invalid_stored.append(f"{name}: {exc}")
            good = make_ct_series(1)[0]
            good_path = tmp_path / "good.dcm"
            good.save_as(good_path, enforce_file_format=True)
            after = client.send("after/valid", good_path.read_bytes())
            echo = client.echo()
            reconnects = client.reconnects
    finally:
        scp.stop()

    by_status = collections.Counter(describe_status(s) if s is not None else "no response" for s in statuses.values())
    by_family: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for name, status in statuses.items():
        by_family[family(name)][f"0x{status:04X}" if status is not None else "none"] += 1
    with capsys.disabled():
        print(f"\nC-STORE fuzz, seed {SEED}: {len(cases)} cases, {reconnects} reconnections")
        for text, count in by_status.most_common():
            print(f"  {count:4d}  {text}")
        for name, counts in sorted(by_family.items()):
            print(f"  {name:28s} " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))

    assert len(cases) >= 300
    unanswered = [n for n, s in statuses.items() if s is None]
    assert unanswered == [], f"no response (abort, hang) for {unanswered}"
    transient = [n for n, s in statuses.items() if s and not is_permanent_failure(s)]
    assert transient == [], f"bad data answered as if it were a resource problem: {transient}"
    assert invalid_stored == []
    for name in ("ct-native/valid", "ct-rle/valid", "ct-j2k/valid", "mr-enhanced/valid", "us-multiframe/valid"):
        assert statuses[name] == 0x0000, name
    for name in ("ct-native/vr-5a5a-0", "ct-native/implicit-declared-explicit", "ct-rle/fragments-garbage"):
        assert statuses[name] == 0xC000, name
    # Pixel bombs are stored (listed, never decoded): see test_scp_faults.
    assert all(statuses[n] in (0x0000, 0xC000, 0xA900) for n in statuses if n.startswith("bomb/"))
    assert after == 0x0000 and good.SOPInstanceUID in index.metas
    assert echo == 0x0000
    # Expected bad input is logged in one line each, without a traceback.
    assert not [r for r in caplog.records if r.name.startswith("triage") and r.exc_info]
    assert "refused (bad data)" in caplog.text
