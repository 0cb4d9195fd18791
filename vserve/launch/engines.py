"""Starting engine-core processes and the handshake that brings them up.

The launcher binds the handshake ROUTER, starts each engine in a clean interpreter
(``python -m vserve.engine.core_proc``), answers each HELLO with EngineStartupInfo and waits
until every engine reports READY. A startup error comes back with the engine's own
traceback; an engine that exits without a word is noticed by polling its process.
After startup the handshake link carries ``ClientDied`` and ``ShutdownEngine``.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import zmq

from vserve import cluster_key
from vserve.config import EngineConfig
from vserve.logging_utils import RateLimitedWarning, get_logger
from vserve.protocol import encode
from vserve.protocol.control import (
    EngineHello,
    EngineReady,
    EngineStartupError,
    EngineStartupInfo,
    RemoteEngineExited,
    ShutdownEngine,
    ToEngine,
    ToSupervisor,
)
from vserve.roles import (
    CLUSTER_KEY_FLAG,
    ENGINE_INDEX_FLAG,
    ENGINE_MODULE,
    LOCAL_ENGINES_FLAG,
    child_command,
    engine_name,
)

logger = get_logger(__name__)
# What peers send may be garbage, at any rate: warned about at most every 10 s.
_warn_bad_frame = RateLimitedWarning(logger)
_decoder = msgspec.msgpack.Decoder(ToSupervisor)


class EngineStartupFailed(RuntimeError):
    def __init__(self, engine_index: int, detail: str) -> None:
        super().__init__(f"engine core {engine_index} failed to start:\n{detail}")
        self.engine_index = engine_index
        self.detail = detail


@dataclass
class EngineLauncher:
    ctx: zmq.Context
    config: EngineConfig
    model_dir: Path
    handshake_addr: str
    input_addrs: list[str]
    output_addrs: list[str]
    engine_ranks: list[int]  # the ranks started here (all for local, none for a headless head)
    num_engines: int  # ranks that must report READY (local + remote)
    stats_addr: str | None = None
    # Engines of `vserve serve` (not of an LLM): they leave shutting down to the supervisor.
    supervised: bool = False
    # Seconds without the head's heartbeat after which a remote engine exits (0: never).
    remote_head_timeout: float = 0.0
    # Multi-node: the cluster key file engines authenticate their links with (the launcher's
    # ``ctx`` is secured with it by its owner).
    cluster_key_file: str | None = None
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)
    ready: dict[int, EngineReady] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A replacement (or a remote engine rejoining) says HELLO with a new connection.
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # Control messages only (the largest, a startup traceback); ZMQ drops a peer that
        # sends more before anything is allocated for it.
        self.sock.setsockopt(zmq.MAXMSGSIZE, 16 << 20)
        # The real endpoint (a tcp port 0 bind picks the port here, not ahead of time).
        self.handshake_addr = cluster_key.bind(self.sock, self.handshake_addr)
        self._peer_ids: dict[int, bytes] = {}
        self._others: list[tuple[bytes, ToSupervisor]] = []
        self._new_ready: list[int] = []
        self._failed: list[tuple[int, str]] = []
        self._remote_exits: list[RemoteEngineExited] = []
        self._early_hellos: dict[int, bytes] = {}
        self.pids: dict[int, int] = {}  # rank → pid its engine said HELLO with
        # Why each replaced rank was replaced (told to its replacement, which counts it).
        self._restart_causes: dict[int, str] = {}

    def set_front_ends(self, input_addrs: list[str], output_addrs: list[str]) -> None:
        """Where engines connect (the API servers' real endpoints); answers the HELLOs of
        remote engines that came before them."""
        self.input_addrs, self.output_addrs = input_addrs, output_addrs
        for rank, peer in self._early_hellos.items():
            self.sock.send_multipart([peer, encode(self._startup_info(rank))])
        self._early_hellos.clear()

    def start_processes(self) -> None:
        for rank in self.engine_ranks:
            self._start(rank)

    def _start(self, rank: int) -> None:
        args = ["--handshake", self.handshake_addr, ENGINE_INDEX_FLAG, str(rank),
                LOCAL_ENGINES_FLAG, str(len(self.engine_ranks))]
        if self.cluster_key_file:
            args += [CLUSTER_KEY_FLAG, self.cluster_key_file]
        cmd = child_command(ENGINE_MODULE, [*args, "--supervised"] if self.supervised
                            else args)
        self.procs[rank] = subprocess.Popen(cmd)
        logger.info("started %s (pid %d)", engine_name(rank), self.procs[rank].pid)

    def restart(self, rank: int, cause: str) -> None:
        """Start a new process for local ``rank`` (its old one is gone or killed here); it
        is ready when :meth:`take_ready` returns the rank. ``cause`` (exited, killed, hung)
        is counted by the replacement in ``vserve_engine_restarts_total``."""
        old = self.procs.get(rank)
        if old is not None and old.poll() is None:
            old.kill()
        if old is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                old.wait(5)
        self.ready.pop(rank, None)
        self._peer_ids.pop(rank, None)
        self._restart_causes[rank] = cause
        self._start(rank)

    def forget(self, rank: int, cause: str) -> None:
        """A remote ``rank`` is gone (``cause`` is counted by its replacement): it must say
        HELLO again to be ready."""
        self.ready.pop(rank, None)
        self._restart_causes[rank] = cause

    def wait_ready(self, timeout: float = 600.0,
                   on_poll: Callable[[], None] | None = None) -> dict[int, EngineReady]:
        """Answer HELLOs and wait for every READY; ``on_poll`` runs ~10 times a second
        (the supervisor checks its other children there). Messages from non-engines are
        kept for ``poll_other``."""
        deadline = time.monotonic() + timeout
        while len(self.ready) < self.num_engines:
            for rank, proc in self.procs.items():
                if rank not in self.ready and proc.poll() is not None:
                    raise EngineStartupFailed(
                        rank, f"the process exited with code {proc.returncode} before READY"
                    )
            if self._failed:
                raise EngineStartupFailed(*self._failed[0])
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.num_engines)) - set(self.ready))
                raise EngineStartupFailed(missing[0], f"no READY within {timeout:.0f}s")
            if on_poll is not None:
                on_poll()
            self._poll(100)
        self._new_ready.clear()
        return self.ready

    def _poll(self, timeout_ms: int) -> None:
        """Receive one message (waiting up to ``timeout_ms``): engine handshakes are handled
        here, whenever they come; anything else is kept for :meth:`poll_other`."""
        received = self._recv(timeout_ms)
        if received is None:
            return
        peer, msg = received
        if isinstance(msg, EngineHello):
            rank = msg.engine_index
            local = self.procs.get(rank)
            if not 0 <= rank < self.num_engines or (
                    rank in self.engine_ranks and (local is None or local.pid != msg.pid)):
                _warn_bad_frame("ignored HELLO from engine %d (pid %d): not an engine this "
                                "head started or expects", rank, msg.pid)
                return
            self._peer_ids[rank] = peer
            self.pids[rank] = msg.pid
            if self.input_addrs:
                self.sock.send_multipart([peer, encode(self._startup_info(rank))])
            else:  # a remote engine early: answered once the API servers have said HELLO
                self._early_hellos[rank] = peer
        elif isinstance(msg, EngineReady):
            self.ready[msg.engine_index] = msg
            self._new_ready.append(msg.engine_index)
        elif isinstance(msg, EngineStartupError):
            self._failed.append((msg.engine_index, msg.error))
        elif isinstance(msg, RemoteEngineExited):
            # Only a rank some other node runs, and that this head knows to be up.
            if msg.engine_index in self.ready and msg.engine_index not in self.engine_ranks:
                self.ready.pop(msg.engine_index)
                self._peer_ids.pop(msg.engine_index, None)
                self._restart_causes[msg.engine_index] = msg.cause
                self._remote_exits.append(msg)
            else:
                _warn_bad_frame("ignored a report that engine %d exited: not a remote "
                                "engine that is up", msg.engine_index)
        else:
            self._others.append((peer, msg))

    def _startup_info(self, rank: int) -> EngineStartupInfo:
        remote = rank not in self.engine_ranks
        return EngineStartupInfo(self.config.to_msgpack(), str(self.model_dir),
                                 self.input_addrs, self.output_addrs, self.stats_addr,
                                 head_timeout=self.remote_head_timeout if remote else 0.0,
                                 restarted_because=self._restart_causes.get(rank, ""))

    def take_ready(self) -> list[int]:
        """Ranks that became ready since the last call (replacements, remote rejoins)."""
        out, self._new_ready = self._new_ready, []
        return out

    def take_remote_exits(self) -> list[RemoteEngineExited]:
        """Remote engines that their node reported dead since the last call."""
        out, self._remote_exits = self._remote_exits, []
        return out

    def take_failed(self) -> list[tuple[int, str]]:
        """Startup errors reported since the last call: ``(rank, traceback)``."""
        out, self._failed = self._failed, []
        return out

    def _recv(self, timeout_ms: int) -> tuple[bytes, ToSupervisor] | None:
        if not self.sock.poll(timeout_ms):
            return None
        frames = self.sock.recv_multipart()
        try:
            if len(frames) != 2:
                raise msgspec.DecodeError(f"expected 2 frames, got {len(frames)}")
            return frames[0], _decoder.decode(frames[1])
        except msgspec.DecodeError as e:
            _warn_bad_frame("dropped a malformed handshake frame: %s", e)
            return None

    def poll_other(self, timeout_ms: int) -> list[tuple[bytes, ToSupervisor]]:
        """Messages from non-engine peers (API servers), waiting up to ``timeout_ms``;
        engine handshakes that arrive meanwhile are handled."""
        if not self._others:
            self._poll(timeout_ms)
        out, self._others = self._others, []
        return out

    def send_to(self, rank: int, control: ToEngine) -> None:
        peer = self._peer_ids.get(rank)
        if peer is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.send_multipart([peer, encode(control)], flags=zmq.NOBLOCK)

    def send_control(self, control: ToEngine) -> None:
        data = encode(control)
        for rank, peer in self._peer_ids.items():
            try:
                self.sock.send_multipart([peer, data], flags=zmq.NOBLOCK)
            except zmq.ZMQError as e:
                logger.debug("control to engine %d not delivered: %s", rank, e)

    def dead_engines(self) -> list[tuple[int, int]]:
        return [(r, p.returncode) for r, p in self.procs.items() if p.poll() is not None]

    def shutdown(self, timeout: float = 5.0) -> None:
        self.send_control(ShutdownEngine())
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.sock.close()


