"""The asyncio adapter of the engine client, for API servers.

Adds to :class:`~vserve.frontend.engine_client.EngineClientCore` only what waiting needs:
the loops that receive announcements, outputs and load snapshots, and one asyncio queue per
route. Invariant: every queue registered here receives its request's outputs up to the
finishing one, or an exception (the engine died, the server shut down) — so no HTTP handler
waits forever.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import zmq
import zmq.asyncio

from vserve.cluster_key import ClusterKey, secure_context
from vserve.frontend.engine_client import (
    EngineClientCore,
    EngineDeadError,
    EngineUnavailableError,
    Route,
)
from vserve.logging_utils import RateLimitedWarning, get_logger
from vserve.protocol.load import LoadSnapshot
from vserve.protocol.outputs import EngineCoreOutput, EngineCoreOutputs, EngineDead
from vserve.protocol.requests import EngineCoreRequest

logger = get_logger(__name__)
# What peers send may be garbage, at any rate: warned about at most every 10 s.
_warn_bad_frame = RateLimitedWarning(logger)
_snapshot_decoder = msgspec.msgpack.Decoder(LoadSnapshot)

OutputQueue = asyncio.Queue[EngineCoreOutput | BaseException]


class AsyncEngineClient:
    def __init__(self, client_index: int, num_engines: int, input_addr: str,
                 output_addr: str, snapshot_addr: str | None = None,
                 key: ClusterKey | None = None) -> None:
        """``key``: multi-node, every link is CURVE-authenticated with it."""
        self.ctx = zmq.asyncio.Context()
        if key is not None:
            secure_context(self.ctx, key, authenticate=True)
        self.core: EngineClientCore[OutputQueue] = EngineClientCore(
            self.ctx, client_index, num_engines, input_addr, output_addr)
        self.load = self.core.load
        self.snapshot: zmq.asyncio.Socket | None = None
        if snapshot_addr:
            self.snapshot = self.ctx.socket(zmq.SUB)
            self.snapshot.setsockopt(zmq.LINGER, 0)
            self.snapshot.setsockopt(zmq.SUBSCRIBE, b"")
            self.snapshot.connect(snapshot_addr)
        self._tasks: list[asyncio.Task[None]] = []
        self._flush_scheduled = False
        # Dead ranks the supervisor is replacing (until they announce themselves again).
        self.replacing: set[int] = set()

    @property
    def input_addr(self) -> str:
        return self.core.input_addr

    @property
    def output_addr(self) -> str:
        return self.core.output_addr

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Start the background loops (call from inside the running event loop)."""
        self._tasks = [asyncio.create_task(self._output_loop(), name="engine-outputs"),
                       asyncio.create_task(self._announce_loop(), name="engine-announce")]
        if self.snapshot is not None:
            self._tasks.append(asyncio.create_task(self._snapshot_loop(), name="snapshots"))

    async def wait_for_engines(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.core.connected) < self.core.num_engines:
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.core.num_engines)) - self.core.connected)
                raise EngineUnavailableError(f"engines {missing} never connected")
            await asyncio.sleep(0.01)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.fail_all(EngineUnavailableError("the server is shutting down"))
        self.core.close()
        self.ctx.destroy(linger=0)

    @property
    def healthy(self) -> bool:
        """Some engine serves, or one that died is being replaced."""
        return bool(self.core.serving or self.replacing)

    @property
    def serving(self) -> bool:
        return bool(self.core.serving)

    @property
    def num_serving(self) -> int:
        return len(self.core.serving)

    @property
    def num_in_flight(self) -> int:
        return len(self.core.routes)

    # ---- requests --------------------------------------------------------------------
    def add_request(self, request: EngineCoreRequest,
                    queue: OutputQueue | None = None) -> Route[OutputQueue]:
        """Route one request; it is sent with the others routed in this turn of the event
        loop. Its outputs (and a failure: it could not be sent, its engine died) go to
        ``queue`` — pass one queue for several requests to wait on all of them at once."""
        route = self.core.add_request(request, asyncio.Queue() if queue is None else queue)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return route

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._fail(self.core.flush())

    @staticmethod
    def _fail(failed: list[tuple[Route[OutputQueue], EngineUnavailableError]]) -> None:
        for route, error in failed:
            route.sink.put_nowait(error)

    def abort(self, request_ids: list[str]) -> None:
        self._fail(self.core.abort(request_ids))

    # ---- failures --------------------------------------------------------------------
    def engine_died(self, engine: int, reason: str, replacing: bool = True,
                    pid: int = 0) -> None:
        """Fail every request that engine owned and route around it (the supervisor or the
        engine told us; only the supervisor knows whether it replaces it). A death of
        ``pid`` when a newer process already announced itself for the rank is old news."""
        known = self.core.engine_pids.get(engine)
        if pid and known is not None and known != pid:
            return
        if replacing:
            self.replacing.add(engine)
        else:
            self.replacing.discard(engine)
        for route in self.core.engine_died(engine, reason):
            route.sink.put_nowait(EngineDeadError(f"engine {engine} died: {reason}"))

    def fail_all(self, error: BaseException) -> None:
        """End every request in flight with ``error`` and abort them in their engines."""
        for route in self.core.take_all():
            route.sink.put_nowait(error)

    # ---- background loops ------------------------------------------------------------
    async def _announce_loop(self) -> None:
        while True:
            self.core.on_request_link(await self.core.input.recv_multipart())
            self.replacing -= self.core.serving  # those that came back

    async def _output_loop(self) -> None:
        while True:
            msg = self.core.decode_output(await self.core.output.recv())
            if isinstance(msg, EngineCoreOutputs):
                for queue, out in self.core.dispatch(msg):
                    queue.put_nowait(out)
            elif isinstance(msg, EngineDead):
                self.engine_died(msg.engine_index, msg.reason)
            # EngineStats: API servers never ask for them.

    async def _snapshot_loop(self) -> None:
        assert self.snapshot is not None
        while True:
            frame = await self.snapshot.recv()
            try:
                self.load.update(_snapshot_decoder.decode(frame))
            except msgspec.DecodeError as e:
                _warn_bad_frame("dropped a malformed load snapshot: %s", e)
