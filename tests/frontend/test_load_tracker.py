"""LoadTracker: an API server's routing view of engine load."""

from __future__ import annotations

import threading
import time

from vserve.frontend.load_tracker import LoadTracker
from vserve.protocol.load import EngineLoad, LoadSnapshot


def _snap(seq: int, *loads: tuple[int, int]) -> LoadSnapshot:
    return LoadSnapshot(
        seq, time.time(), [EngineLoad(i, w, r, 0.0) for i, (w, r) in enumerate(loads)]
    )


def test_tracker_picks_least_loaded_by_score() -> None:
    tracker = LoadTracker(3)
    # scores 4*w + r: 4*1+0=4, 4*0+5=5, 4*0+3=3 -> engine 2
    assert tracker.update(_snap(1, (1, 0), (0, 5), (0, 3)))
    assert tracker.pick_and_bump() == 2
    assert tracker.update(_snap(2, (0, 1), (0, 5), (0, 3)))  # replaces the bump too
    assert tracker.pick_and_bump() == 0


def test_tracker_ignores_stale_snapshots() -> None:
    tracker = LoadTracker(2)
    assert tracker.update(_snap(5, (0, 0), (9, 9)))
    assert not tracker.update(_snap(4, (9, 9), (0, 0)))
    assert not tracker.update(_snap(5, (9, 9), (0, 0)))
    assert tracker.seq == 5 and tracker.pick_and_bump() == 0


def test_tracker_spreads_a_burst_with_bump() -> None:
    tracker = LoadTracker(4)
    tracker.update(_snap(1, (0, 2), (0, 0), (0, 0), (0, 1)))
    picks = [tracker.pick_and_bump() for _ in range(12)]
    # Engines 1 and 2 start idle and take turns first; the rest join as their scores tie.
    assert picks[:2] == [1, 2]
    counts = [picks.count(i) for i in range(4)]
    assert max(counts) - min(counts) <= 1, counts
    # A new snapshot replaces the local bumps.
    tracker.update(_snap(2, (0, 0), (5, 0), (5, 0), (5, 0)))
    assert tracker.loads() == [(0, 0), (5, 0), (5, 0), (5, 0)]
    assert tracker.pick_and_bump() == 0


def test_tracker_round_robin_on_ties_and_thread_safety() -> None:
    tracker = LoadTracker(3)
    assert [tracker.pick_and_bump() for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    results: list[int] = []
    lock = threading.Lock()

    def route() -> None:
        mine = [tracker.pick_and_bump() for _ in range(300)]
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=route) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.count(i) for i in range(3)) == [400, 400, 400]
    assert tracker.loads() == [(402, 0), (402, 0), (402, 0)]


def test_unbump_stops_counting_a_routed_request_once_it_started() -> None:
    tracker = LoadTracker(2)
    first = tracker.pick_and_bump()
    second = tracker.pick_and_bump()
    assert {first, second} == {0, 1}
    assert sum(w for w, _ in tracker.loads()) == 2
    tracker.unbump(first)
    assert tracker.loads()[first][0] == 0
    tracker.unbump(first)  # never below zero (a snapshot may have reset it already)
    assert tracker.loads()[first][0] == 0
    assert tracker.loads()[second][0] == 1
