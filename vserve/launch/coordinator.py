"""The coordinator, a thread of the supervisor: engine load in, one snapshot of all engines out.

Links (architecture §3; structs in :mod:`vserve.protocol.load`)::

    engine r  --PUSH EngineLoad-->  [PULL stats_in]  Coordinator  [PUB snapshot_out]
                                                        --LoadSnapshot--> SUB in every API server

Invariants:
- A snapshot always lists every engine, index i at position i; an engine that has not
  reported yet reads as idle (zeros).
- Snapshots go out at most every ``publish_interval`` (100 ms) while loads change, and as a
  heartbeat every ``heartbeat_interval`` (2 s) otherwise, so a late subscriber is current
  within one heartbeat and an API server can tell a dead coordinator by silence.
- ``seq`` increases by one per snapshot; the API servers' ``LoadTracker`` ignores anything
  not newer.
- A malformed frame is logged (rate-limited) and dropped; it never stops the loop.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import msgspec
import zmq

from vserve import cluster_key
from vserve.cluster_key import ClusterKey, secure_context
from vserve.logging_utils import get_logger
from vserve.protocol import encode
from vserve.protocol.load import EngineLoad, LoadSnapshot

logger = get_logger(__name__)
_load_decoder = msgspec.msgpack.Decoder(EngineLoad)

PUBLISH_INTERVAL_S = 0.1
HEARTBEAT_INTERVAL_S = 2.0
_BAD_FRAME_LOG_INTERVAL_S = 10.0


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
        key: ClusterKey | None = None,
    ) -> None:
        """``key``: multi-node, both sockets are CURVE servers admitting its holders only."""
        if num_engines < 1:
            raise ValueError(f"num_engines must be positive, got {num_engines}")
        self.num_engines = num_engines
        self.publish_interval = publish_interval
        self.heartbeat_interval = heartbeat_interval
        self.loads = [EngineLoad(i, 0, 0, 0.0) for i in range(num_engines)]
        # time.monotonic() of each engine's latest report: engines report at least every
        # second from their busy loop, so this is their heartbeat (read by the supervisor;
        # floats are replaced whole, so reading from another thread is safe). None: never.
        self.last_seen: list[float | None] = [None] * num_engines
        self._forget: set[int] = set()
        self._forget_lock = threading.Lock()
        self.seq = 0
        self._ctx = zmq.Context()
        if key is not None:
            secure_context(self._ctx, key, authenticate=True)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pub = self._ctx.socket(zmq.PUB)
        for sock in (self._pull, self._pub):
            sock.setsockopt(zmq.LINGER, 0)
        self._pull.setsockopt(zmq.MAXMSGSIZE, 1 << 20)  # load reports are a few dozen bytes
        # Snapshots supersede each other: a subscriber that cannot keep up loses old ones.
        self._pub.setsockopt(zmq.SNDHWM, 64)
        try:
            # The real endpoints: a tcp port-0 bind picks its port here, not ahead of time.
            self.stats_in_addr = cluster_key.bind(self._pull, stats_in_addr)
            self.snapshot_out_addr = cluster_key.bind(self._pub, snapshot_out_addr)
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
                if self._wake_r.fileno() in events:
                    self._wake_r.recv(4096)
                    dirty |= self._apply_forgets()
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
        self.last_seen[load.engine_index] = time.monotonic()
        if load == self.loads[load.engine_index]:
            return False
        self.loads[load.engine_index] = load
        return True

    def forget(self, engine_index: int) -> None:
        """An engine died: from the next snapshot on it reads idle and unseen until its
        replacement reports (no ghost queue steers routing). Safe from any thread."""
        with self._forget_lock:
            self._forget.add(engine_index)
        self.last_seen[engine_index] = None
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _apply_forgets(self) -> bool:
        with self._forget_lock:
            ranks, self._forget = self._forget, set()
        for r in ranks:
            self.loads[r] = EngineLoad(r, 0, 0, 0.0)
        return bool(ranks)

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
            self._pub.send(encode(snapshot), zmq.NOBLOCK)
        except zmq.Again:  # pragma: no cover - PUB drops instead of blocking
            pass
