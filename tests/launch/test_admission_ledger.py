"""The admission ledger's check-and-add is atomic across processes."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from vserve.launch.admission import AdmissionLedger

LIMIT = 8


def _grab(path: str, index: int, tries: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    ledger = AdmissionLedger(path, 4)
    out.put(sum(ledger.try_admit(index, 1, LIMIT) is None for _ in range(tries)))


def test_concurrent_admission_never_exceeds_the_limit(tmp_path: Path) -> None:
    path = str(tmp_path / "admission")
    AdmissionLedger(path, 4, create=True)
    out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    procs = [mp.get_context("fork").Process(target=_grab, args=(path, i, 2000, out))
             for i in range(4)]
    for p in procs:
        p.start()
    admitted = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    assert sum(admitted) == LIMIT
    assert sum(AdmissionLedger(path, 4).counts()) == LIMIT


def test_release_reset_and_a_lone_large_request(tmp_path: Path) -> None:
    ledger = AdmissionLedger(tmp_path / "admission", 2, create=True)
    assert ledger.try_admit(0, 20, LIMIT) is None  # alone on an idle server: admitted
    assert ledger.try_admit(1, 1, LIMIT) == 20
    ledger.release(0, 15)
    assert ledger.try_admit(1, 3, LIMIT) is None
    assert ledger.counts() == [5, 3]
    assert ledger.try_admit(1, 1, LIMIT) == 8
    ledger.reset(0)  # server 0 died: its places are free
    ledger.release(1, 10)  # never below zero
    assert ledger.counts() == [0, 0]
