"""The data-parallel coordinator as a real process on real ZMQ ipc sockets, with fake engines
(PUSH) below it and an API-server stand-in (SUB) above it; and the LoadTracker routing logic.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
import pytest
import zmq

from vserve.engine.coordinator import (
    Coordinator,
    EngineLoad,
    LoadSnapshot,
    LoadTracker,
    decode_snapshot,
    encode_load,
)
from vserve.launch.lifetime import spawn_child, terminate_children
from vserve.launch.rundir import ipc_endpoint, make_run_dir, remove_run_dir

HEARTBEAT_S = 0.3  # shortened from the 2 s default so that the idle test stays fast


@dataclass
class Rig:
    proc: subprocess.Popen[bytes]
    engines: list[zmq.Socket[bytes]]
    sub: zmq.Socket[bytes]

    def push(self, load: EngineLoad, engine: int | None = None) -> None:
        self.engines[load.engine_index if engine is None else engine].send(encode_load(load))

    def recv(self, timeout: float = 5.0) -> LoadSnapshot:
        if not self.sub.poll(int(timeout * 1000)):
            raise AssertionError(
                f"no snapshot within {timeout}s (coordinator rc={self.proc.poll()})"
            )
        return decode_snapshot(self.sub.recv())

    def recv_until(self, want: list[EngineLoad], timeout: float = 5.0) -> LoadSnapshot:
        deadline = time.monotonic() + timeout
        while True:
            snap = self.recv(max(0.01, deadline - time.monotonic()))
            if snap.engines == want:
                return snap
            if time.monotonic() > deadline:
                raise AssertionError(f"last snapshot {snap.engines}, wanted {want}")


@pytest.fixture
def rig() -> Iterator[Rig]:
    run_dir = make_run_dir()
    ctx = zmq.Context()
    stats_in = ipc_endpoint(run_dir, "coord_in")
    snapshot_out = ipc_endpoint(run_dir, "coord_out")
    proc = spawn_child(
        "vserve.engine.coordinator",
        ["--stats-in", stats_in, "--snapshot-out", snapshot_out, "--num-engines", "2"]
        + ["--heartbeat-interval", str(HEARTBEAT_S)],
        "Coordinator",
    )
    try:
        engines = []
        for _ in range(2):
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(stats_in)  # ipc connect retries until the coordinator binds
            engines.append(push)
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(snapshot_out)
        yield Rig(proc, engines, sub)
    finally:
        terminate_children([proc], timeout=3.0)
        ctx.destroy(linger=0)
        remove_run_dir(run_dir)


def test_snapshot_lists_both_engines(rig: Rig) -> None:
    first = rig.recv()  # initial or heartbeat snapshot: every engine, idle until it reports
    assert [e.engine_index for e in first.engines] == [0, 1]
    a, b = EngineLoad(0, 3, 5, 0.25), EngineLoad(1, 1, 7, 0.5)
    rig.push(a)
    rig.push(b)
    snap = rig.recv_until([a, b])
    assert snap.seq > first.seq and snap.timestamp >= first.timestamp


def test_malformed_frames_are_dropped(rig: Rig) -> None:
    good = EngineLoad(0, 2, 2, 0.1)
    rig.push(good)
    rig.recv_until([good, EngineLoad(1, 0, 0, 0.0)])
    rig.engines[0].send(b"\xc1 not msgpack")
    rig.engines[0].send(msgspec.msgpack.encode({"engine_index": 0}))  # wrong shape
    rig.engines[0].send(msgspec.msgpack.encode(["x", 1, 2, 0.0]))  # wrong field type
    rig.engines[0].send_multipart([encode_load(good), b"extra frame"])
    rig.push(EngineLoad(9, 1, 1, 0.0), engine=0)  # no such engine
    after = EngineLoad(1, 4, 0, 0.9)
    rig.push(after)
    rig.recv_until([good, after])  # still serving, and garbage changed nothing
    assert rig.proc.poll() is None


def test_heartbeat_when_idle(rig: Rig) -> None:
    load = EngineLoad(1, 0, 1, 0.0)
    rig.push(load)
    rig.recv_until([EngineLoad(0, 0, 0, 0.0), load])
    start = time.monotonic()
    beats = [rig.recv(), rig.recv(), rig.recv()]
    elapsed = time.monotonic() - start
    assert [b.seq for b in beats] == list(range(beats[0].seq, beats[0].seq + 3))
    assert all(b.engines == [EngineLoad(0, 0, 0, 0.0), load] for b in beats)
    assert HEARTBEAT_S * 1.5 <= elapsed <= HEARTBEAT_S * 3 + 1.0
    assert rig.proc.poll() is None


def test_publishes_at_most_every_100ms_while_changing(rig: Rig) -> None:
    rig.recv()
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < 0.6:
        rig.push(EngineLoad(0, i, 0, 0.0))
        i += 1
        time.sleep(0.001)
    final = EngineLoad(0, i - 1, 0, 0.0)
    window = time.monotonic() - start
    snaps = []
    while True:
        snap = rig.recv()
        snaps.append(snap)
        if snap.engines[0] == final:
            break
    assert i > 100  # many updates ...
    assert len(snaps) <= window / 0.1 + 3  # ... few snapshots
    assert len(snaps) >= 3  # but it kept publishing while loads changed


def test_sigterm_exits_cleanly(rig: Rig) -> None:
    rig.recv()
    rig.proc.terminate()
    assert rig.proc.wait(timeout=5.0) == 0


def test_exits_when_parent_pid_is_not_its_parent() -> None:
    run_dir = make_run_dir()
    proc = spawn_child(
        "vserve.engine.coordinator",
        ["--stats-in", ipc_endpoint(run_dir, "i"), "--snapshot-out", ipc_endpoint(run_dir, "o")]
        + ["--num-engines", "1", "--parent-pid", "1", "--log-level", "CRITICAL"],
        "Coordinator",
    )
    try:
        assert proc.wait(timeout=10.0) != 0
    finally:
        terminate_children([proc], timeout=1.0)
        remove_run_dir(run_dir)


def test_in_process_stop_is_prompt() -> None:
    run_dir = make_run_dir()
    try:
        tcp = Coordinator("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", 1)
        # The real endpoints are reported: port 0 is resolved at bind time.
        assert tcp.stats_in_addr.startswith("tcp://127.0.0.1:")
        assert not tcp.snapshot_out_addr.endswith(":0")
        tcp.stop()
        tcp.run()  # stopped before it ran: returns at once and closes its sockets
        coord = Coordinator(ipc_endpoint(run_dir, "i"), ipc_endpoint(run_dir, "o"), 1)
        assert coord.stats_in_addr == ipc_endpoint(run_dir, "i")
        thread = threading.Thread(target=coord.run)
        thread.start()
        time.sleep(0.2)
        start = time.monotonic()
        coord.stop()
        thread.join(timeout=5.0)
        assert not thread.is_alive() and time.monotonic() - start < 0.5
        with pytest.raises(ValueError):
            Coordinator(ipc_endpoint(run_dir, "i2"), ipc_endpoint(run_dir, "o2"), 0)
    finally:
        remove_run_dir(run_dir)


# ------------------------------------------------------------------------------- LoadTracker


def _snap(seq: int, *loads: tuple[int, int]) -> LoadSnapshot:
    return LoadSnapshot(
        seq, time.time(), [EngineLoad(i, w, r, 0.0) for i, (w, r) in enumerate(loads)]
    )


def test_tracker_picks_least_loaded_by_score() -> None:
    tracker = LoadTracker(3)
    # scores 4*w + r: 4*1+0=4, 4*0+5=5, 4*0+3=3 -> engine 2
    assert tracker.update(_snap(1, (1, 0), (0, 5), (0, 3)))
    assert tracker.pick_engine() == 2
    assert tracker.update(_snap(2, (0, 1), (0, 5), (0, 3)))
    assert tracker.pick_engine() == 0


def test_tracker_ignores_stale_snapshots() -> None:
    tracker = LoadTracker(2)
    assert tracker.update(_snap(5, (0, 0), (9, 9)))
    assert not tracker.update(_snap(4, (9, 9), (0, 0)))
    assert not tracker.update(_snap(5, (9, 9), (0, 0)))
    assert tracker.seq == 5 and tracker.pick_engine() == 0
    tracker.reset()  # e.g. after a coordinator restart: seq starts again
    assert tracker.update(_snap(1, (9, 9), (0, 0)))
    assert tracker.pick_engine() == 1


def test_tracker_spreads_a_burst_with_bump() -> None:
    tracker = LoadTracker(4)
    tracker.update(_snap(1, (0, 2), (0, 0), (0, 0), (0, 1)))
    picks = []
    for _ in range(12):
        i = tracker.pick_engine()
        tracker.bump(i)
        picks.append(i)
    # Engines 1 and 2 start idle and take turns first; the rest join as their scores tie.
    assert picks[:2] == [1, 2]
    counts = [picks.count(i) for i in range(4)]
    assert max(counts) - min(counts) <= 1, counts
    # A new snapshot replaces the local bumps.
    tracker.update(_snap(2, (0, 0), (5, 0), (5, 0), (5, 0)))
    assert tracker.loads() == [(0, 0), (5, 0), (5, 0), (5, 0)]
    assert tracker.pick_engine() == 0


def test_tracker_round_robin_on_ties_and_thread_safety() -> None:
    tracker = LoadTracker(3)
    assert [tracker.pick_engine() for _ in range(6)] == [0, 1, 2, 0, 1, 2]
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


def test_unbump_stops_counting_a_routed_request_once_it_started() -> None:
    from vserve.engine.coordinator import LoadTracker

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
