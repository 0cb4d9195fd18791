"""Starting engine-core processes and the handshake that brings them up.

The launcher binds the handshake ROUTER, starts each engine in a clean interpreter
(``python -m vserve.engine.core_proc``), answers each HELLO with EngineStartupInfo and waits
until every engine reports READY. A startup error comes back with the engine's own
traceback; an engine that exits without a word is noticed by polling its process.
After startup the handshake link carries ``ClientDied`` and ``ShutdownEngine``.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import zmq

from vserve.config import EngineConfig
from vserve.logging_utils import RateLimitedWarning, get_logger
from vserve.protocol import encode
from vserve.protocol.control import (
    EngineHello,
    EngineReady,
    EngineStartupError,
    EngineStartupInfo,
    ShutdownEngine,
    ToEngine,
    ToSupervisor,
)
from vserve.roles import ENGINE_INDEX_FLAG, ENGINE_MODULE, child_command, engine_name

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
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)
    ready: dict[int, EngineReady] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.bind(self.handshake_addr)
        # The real endpoint (a tcp port 0 bind picks the port here, not ahead of time).
        self.handshake_addr = str(self.sock.getsockopt_string(zmq.LAST_ENDPOINT))
        self._peer_ids: dict[int, bytes] = {}
        self._others: list[tuple[bytes, ToSupervisor]] = []
        # Engine messages that arrived while someone else was polling (a remote engine may
        # say HELLO before the head is ready to answer it).
        self._engine_msgs: list[tuple[bytes, ToSupervisor]] = []

    def start_processes(self) -> None:
        for rank in self.engine_ranks:
            args = ["--handshake", self.handshake_addr, ENGINE_INDEX_FLAG, str(rank)]
            cmd = child_command(ENGINE_MODULE, [*args, "--supervised"] if self.supervised
                                else args)
            self.procs[rank] = subprocess.Popen(cmd)
            logger.info("started %s (pid %d)", engine_name(rank), self.procs[rank].pid)

    def wait_ready(self, timeout: float = 600.0,
                   on_poll: Callable[[], None] | None = None) -> dict[int, EngineReady]:
        """Answer HELLOs and wait for every READY; ``on_poll`` runs ~10 times a second
        (the supervisor checks its other children there). Messages from non-engines are
        kept for ``poll_other``."""
        info = EngineStartupInfo(self.config.to_msgpack(), str(self.model_dir),
                                 self.input_addrs, self.output_addrs, self.stats_addr)
        info_bytes = encode(info)
        deadline = time.monotonic() + timeout
        while len(self.ready) < self.num_engines:
            for rank, proc in self.procs.items():
                if rank not in self.ready and proc.poll() is not None:
                    raise EngineStartupFailed(
                        rank, f"the process exited with code {proc.returncode} before READY"
                    )
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.num_engines)) - set(self.ready))
                raise EngineStartupFailed(missing[0], f"no READY within {timeout:.0f}s")
            if on_poll is not None:
                on_poll()
            if self._engine_msgs:
                peer, msg = self._engine_msgs.pop(0)
            else:
                received = self._recv(100)
                if received is None:
                    continue
                peer, msg = received
            if isinstance(msg, EngineHello):
                self._peer_ids[msg.engine_index] = peer
                self.sock.send_multipart([peer, info_bytes])
            elif isinstance(msg, EngineReady):
                self.ready[msg.engine_index] = msg
            elif isinstance(msg, EngineStartupError):
                raise EngineStartupFailed(msg.engine_index, msg.error)
            else:
                self._others.append((peer, msg))
        return self.ready

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
        """Messages from non-engine peers (API servers), waiting up to ``timeout_ms``."""
        if not self._others:
            received = self._recv(timeout_ms)
            if received is not None:
                if not isinstance(received[1], (EngineHello, EngineReady, EngineStartupError)):
                    self._others.append(received)
                elif len(self.ready) < self.num_engines:
                    self._engine_msgs.append(received)  # for wait_ready
                else:
                    logger.warning("late engine handshake message ignored: %r", received[1])
        out, self._others = self._others, []
        return out

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


