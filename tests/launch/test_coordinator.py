"""The coordinator on real ZMQ ipc sockets, run as in the supervisor (a thread), with fake
engines (PUSH) below it and an API-server stand-in (SUB) above it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
import pytest
import zmq

from vserve.launch.coordinator import Coordinator
from vserve.launch.rundir import ipc_endpoint, make_run_dir, remove_run_dir
from vserve.protocol import encode
from vserve.protocol.load import EngineLoad, LoadSnapshot

HEARTBEAT_S = 0.3  # shortened from the 2 s default so that the idle test stays fast
_snapshot_decoder = msgspec.msgpack.Decoder(LoadSnapshot)


@dataclass
class Rig:
    thread: threading.Thread
    engines: list[zmq.Socket[bytes]]
    sub: zmq.Socket[bytes]

    def push(self, load: EngineLoad, engine: int | None = None) -> None:
        self.engines[load.engine_index if engine is None else engine].send(encode(load))

    def recv(self, timeout: float = 5.0) -> LoadSnapshot:
        if not self.sub.poll(int(timeout * 1000)):
            raise AssertionError(
                f"no snapshot within {timeout}s (coordinator alive: {self.thread.is_alive()})"
            )
        return _snapshot_decoder.decode(self.sub.recv())

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
    coordinator = Coordinator(ipc_endpoint(run_dir, "coord_in"),
                              ipc_endpoint(run_dir, "coord_out"), 2,
                              heartbeat_interval=HEARTBEAT_S)
    thread = threading.Thread(target=coordinator.run, name="coordinator", daemon=True)
    thread.start()
    try:
        engines = []
        for _ in range(2):
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(coordinator.stats_in_addr)
            engines.append(push)
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(coordinator.snapshot_out_addr)
        yield Rig(thread, engines, sub)
    finally:
        coordinator.stop()
        thread.join(timeout=5.0)
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
    rig.engines[0].send_multipart([encode(good), b"extra frame"])
    rig.push(EngineLoad(9, 1, 1, 0.0), engine=0)  # no such engine
    after = EngineLoad(1, 4, 0, 0.9)
    rig.push(after)
    rig.recv_until([good, after])  # still serving, and garbage changed nothing
    assert rig.thread.is_alive()


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
    assert rig.thread.is_alive()


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
