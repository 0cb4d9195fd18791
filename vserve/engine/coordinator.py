"""The data-parallel coordinator: engine load in, one snapshot of all engines out.

Links (architecture §3)::

    engine r  --PUSH EngineLoad-->  [PULL stats_in]  Coordinator  [PUB snapshot_out]
                                                        --LoadSnapshot--> SUB in every API server

Invariants:
- A snapshot always lists every engine, index i at position i; an engine that has not
  reported yet reads as idle (zeros).
- Snapshots go out at most every ``publish_interval`` (100 ms) while loads change, and as a
  heartbeat every ``heartbeat_interval`` (2 s) otherwise, so a late subscriber is current
  within one heartbeat and an API server can tell a dead coordinator by silence.
- ``seq`` increases by one per snapshot; :class:`LoadTracker` ignores anything not newer.
- A malformed frame is logged (rate-limited) and dropped; it never stops the loop.
- No pickle: msgpack against the struct types below.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import threading
import time
from types import FrameType

import msgspec
import zmq

from vserve.launch.lifetime import exit_when_parent_dies, set_process_title
from vserve.logging_utils import get_logger, init_logging

# Not __name__: run with -m this module is __main__, outside the vserve logger hierarchy.
logger = get_logger("vserve.engine.coordinator")

PUBLISH_INTERVAL_S = 0.1
HEARTBEAT_INTERVAL_S = 2.0
_BAD_FRAME_LOG_INTERVAL_S = 10.0


class EngineLoad(msgspec.Struct, array_like=True, gc=False):
    """Engine → coordinator: this engine's current queue depths and KV-cache use (0..1)."""

    engine_index: int
    num_waiting: int
    num_running: int
    kv_cache_usage: float
    # Cumulative counters, for the supervisor's periodic stats line.
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class LoadSnapshot(msgspec.Struct, array_like=True, gc=False):
    """Coordinator → API servers: every engine's latest load; ``engines[i].engine_index == i``."""

    seq: int
    timestamp: float  # time.time() on the coordinator when published
    engines: list[EngineLoad]


_load_encoder = msgspec.msgpack.Encoder()
_load_decoder = msgspec.msgpack.Decoder(EngineLoad)
_snapshot_decoder = msgspec.msgpack.Decoder(LoadSnapshot)


def encode_load(load: EngineLoad) -> bytes:
    """For engines: the one frame to PUSH to the coordinator."""
    return _load_encoder.encode(load)


def encode_snapshot(snapshot: LoadSnapshot) -> bytes:
    return _load_encoder.encode(snapshot)


def decode_snapshot(frame: bytes) -> LoadSnapshot:
    """For API servers: decode one SUB frame (raises msgspec.DecodeError on garbage)."""
    return _snapshot_decoder.decode(frame)


class Coordinator:
    """Binds its two sockets at construction; :meth:`run` loops until :meth:`stop`.

    :meth:`stop` may be called from any thread or a signal handler; every other method belongs
    to the thread that calls :meth:`run` (ZMQ sockets are not thread-safe).
    """

    def __init__(
        self,
        stats_in_addr: str,
        snapshot_out_addr: str,
        num_engines: int,
        publish_interval: float = PUBLISH_INTERVAL_S,
        heartbeat_interval: float = HEARTBEAT_INTERVAL_S,
    ) -> None:
        if num_engines < 1:
            raise ValueError(f"num_engines must be positive, got {num_engines}")
        self.num_engines = num_engines
        self.publish_interval = publish_interval
        self.heartbeat_interval = heartbeat_interval
        self.loads = [EngineLoad(i, 0, 0, 0.0) for i in range(num_engines)]
        self.seq = 0
        self._ctx = zmq.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pub = self._ctx.socket(zmq.PUB)
        for sock in (self._pull, self._pub):
            sock.setsockopt(zmq.LINGER, 0)
        # Snapshots supersede each other: a subscriber that cannot keep up loses old ones.
        self._pub.setsockopt(zmq.SNDHWM, 64)
        try:
            self._pull.bind(stats_in_addr)
            self._pub.bind(snapshot_out_addr)
            # The real endpoints: a tcp port-0 bind picks its port here, not ahead of time.
            self.stats_in_addr = str(self._pull.getsockopt_string(zmq.LAST_ENDPOINT))
            self.snapshot_out_addr = str(self._pub.getsockopt_string(zmq.LAST_ENDPOINT))
        except zmq.ZMQError:
            self._close_sockets()
            raise
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._stopped = threading.Event()
        self._bad_frames = 0
        self._bad_logged_at = float("-inf")

    def stop(self) -> None:
        """Ask :meth:`run` to return soon. Safe from other threads and signal handlers."""
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _close_sockets(self) -> None:
        self._pull.close(linger=0)
        self._pub.close(linger=0)
        self._ctx.term()

    def run(self) -> None:
        """Serve until :meth:`stop`; closes the sockets on the way out."""
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        last_publish = float("-inf")
        dirty = True  # publish the initial all-idle snapshot at once
        try:
            while not self._stopped.is_set():
                now = time.monotonic()
                due = last_publish + (self.publish_interval if dirty else self.heartbeat_interval)
                if now >= due:
                    self._publish()
                    last_publish, dirty = now, False
                    continue
                events = dict(poller.poll(timeout=max(1, int((due - now) * 1000) + 1)))
                if self._pull in events:
                    dirty |= self._drain()
        finally:
            self._close_sockets()
            self._wake_r.close()
            self._wake_w.close()

    def _drain(self) -> bool:
        """Take every queued load report; True if any engine's load changed."""
        changed = False
        while True:
            try:
                frames = self._pull.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return changed
            changed |= self._apply(frames)

    def _apply(self, frames: list[bytes]) -> bool:
        if len(frames) != 1:
            self._bad_frame(f"{len(frames)} frames, expected 1")
            return False
        try:
            load = _load_decoder.decode(frames[0])
        except msgspec.DecodeError as exc:
            self._bad_frame(str(exc))
            return False
        if not 0 <= load.engine_index < self.num_engines:
            self._bad_frame(f"engine_index {load.engine_index} out of 0..{self.num_engines - 1}")
            return False
        if load == self.loads[load.engine_index]:
            return False
        self.loads[load.engine_index] = load
        return True

    def _bad_frame(self, why: str) -> None:
        # Rate-limited: a misbehaving peer must not turn into a log flood.
        self._bad_frames += 1
        now = time.monotonic()
        if now - self._bad_logged_at >= _BAD_FRAME_LOG_INTERVAL_S:
            logger.warning("dropped malformed load report (%d so far): %s", self._bad_frames, why)
            self._bad_logged_at = now

    def _publish(self) -> None:
        self.seq += 1
        snapshot = LoadSnapshot(self.seq, time.time(), list(self.loads))
        try:
            self._pub.send(encode_snapshot(snapshot), zmq.NOBLOCK)
        except zmq.Again:  # pragma: no cover - PUB drops instead of blocking
            pass


class LoadTracker:
    """An API server's view of engine load, for routing. Thread-safe; no asyncio needed.

    Holds the latest snapshot plus local bumps: each request routed since that snapshot adds
    one to its engine's waiting count, so that a burst arriving between two snapshots spreads
    over the engines instead of piling onto the one that looked idlest. A newer snapshot
    replaces the local copy (and so drops the bumps).
    """

    def __init__(self, num_engines: int) -> None:
        if num_engines < 1:
            raise ValueError(f"num_engines must be positive, got {num_engines}")
        self.num_engines = num_engines
        self._lock = threading.Lock()
        self._waiting = [0] * num_engines
        self._running = [0] * num_engines
        self._seq = -1
        self._updated_at: float | None = None
        self._next = 0  # round-robin cursor among equally loaded engines

    @property
    def seq(self) -> int:
        return self._seq

    def seconds_since_update(self) -> float | None:
        """Monotonic seconds since the last accepted snapshot; None before the first."""
        with self._lock:
            return None if self._updated_at is None else time.monotonic() - self._updated_at

    def update(self, snapshot: LoadSnapshot) -> bool:
        """Adopt ``snapshot`` unless its seq is not newer; True if adopted.

        Engines outside ``0..num_engines-1`` are ignored. After a coordinator restart (seq
        starts again at 1) call :meth:`reset` first.
        """
        with self._lock:
            if snapshot.seq <= self._seq:
                return False
            self._seq = snapshot.seq
            self._updated_at = time.monotonic()
            for load in snapshot.engines:
                if 0 <= load.engine_index < self.num_engines:
                    self._waiting[load.engine_index] = load.num_waiting
                    self._running[load.engine_index] = load.num_running
            return True

    def reset(self) -> None:
        with self._lock:
            self._seq = -1
            self._updated_at = None

    def _pick_locked(self) -> int:
        scores = [4 * w + r for w, r in zip(self._waiting, self._running, strict=True)]
        best = min(scores)
        n = self.num_engines
        # Round-robin among ties: deterministic, yet equal engines take turns.
        for k in range(n):
            i = (self._next + k) % n
            if scores[i] == best:
                self._next = (i + 1) % n
                return i
        raise AssertionError("unreachable")  # pragma: no cover

    def pick_engine(self) -> int:
        """The engine with the lowest ``4 * waiting + running``; ties go round-robin."""
        with self._lock:
            return self._pick_locked()

    def bump(self, engine_index: int) -> None:
        """Count one more waiting request on ``engine_index`` until the next snapshot."""
        with self._lock:
            self._waiting[engine_index] += 1

    def unbump(self, engine_index: int) -> None:
        """A routed request left the waiting state (its first output arrived, or it ended):
        stop counting it. Without this a burst of short requests would keep counting as
        waiting until the next snapshot — up to a heartbeat on an idle engine — and a
        server-wide queue bound would refuse requests with nothing waiting."""
        with self._lock:
            if self._waiting[engine_index] > 0:
                self._waiting[engine_index] -= 1

    def pick_and_bump(self) -> int:
        """:meth:`pick_engine` then :meth:`bump`, atomically (for concurrent routers)."""
        with self._lock:
            index = self._pick_locked()
            self._waiting[index] += 1
            return index

    def loads(self) -> list[tuple[int, int]]:
        """(waiting, running) per engine, bumps included; for metrics and tests."""
        with self._lock:
            return list(zip(self._waiting, self._running, strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vserve.engine.coordinator")
    parser.add_argument("--stats-in", required=True, help="ZMQ address to bind the PULL on")
    parser.add_argument("--snapshot-out", required=True, help="ZMQ address to bind the PUB on")
    parser.add_argument("--num-engines", type=int, required=True)
    parser.add_argument("--publish-interval", type=float, default=PUBLISH_INTERVAL_S)
    parser.add_argument("--heartbeat-interval", type=float, default=HEARTBEAT_INTERVAL_S)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)

    init_logging("Coordinator", args.log_level)
    set_process_title("Coordinator")
    exit_when_parent_dies(parent_pid=args.parent_pid)
    coordinator = Coordinator(
        args.stats_in,
        args.snapshot_out,
        args.num_engines,
        publish_interval=args.publish_interval,
        heartbeat_interval=args.heartbeat_interval,
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        coordinator.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logger.info(
        "coordinating %d engines: stats in %s, snapshots out %s",
        args.num_engines,
        args.stats_in,
        args.snapshot_out,
    )
    coordinator.run()
    logger.info("coordinator stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
