"""The API server's side of the request and output links (asyncio, ZMQ).

Each API server (client_index i) binds one ROUTER (requests out, to every engine's DEALER,
addressed by the engine's rank) and one PULL (outputs in, from every engine's PUSH). It
routes each request to the engine with the lowest load score in the coordinator's latest
snapshot (``LoadTracker``), remembers the owner so aborts go to the right engine, and feeds
each request's outputs to its ``RequestStream``.

Invariant: every stream registered here ends — with a finished output, or with an error
when its engine dies or the client shuts down — so no HTTP handler waits forever.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from vserve.engine.coordinator import LoadTracker, decode_snapshot
from vserve.engine.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    RequestType,
    UtilityRequest,
    engine_identity,
)
from vserve.logging_utils import get_logger

logger = get_logger(__name__)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)


class EngineDeadError(RuntimeError):
    """The engine that owned a request is gone; the request cannot finish."""


class EngineUnavailableError(RuntimeError):
    """No engine can take a request right now (not connected, or shutting down)."""


@dataclass
class RequestStream:
    request_id: str
    engine_index: int
    queue: asyncio.Queue[EngineCoreOutput | BaseException] = field(default_factory=asyncio.Queue)
    finished: bool = False
    started: bool = False  # an output arrived: the engine is past queueing it
    arrival_time: float = field(default_factory=time.time)

    async def get(self) -> EngineCoreOutput:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


class AsyncEngineClient:
    def __init__(
        self,
        client_index: int,
        num_engines: int,
        input_addr: str,
        output_addr: str,
        snapshot_addr: str | None = None,
    ) -> None:
        self.client_index = client_index
        self.num_engines = num_engines
        self.ctx = zmq.asyncio.Context()
        self.input = self.ctx.socket(zmq.ROUTER)
        self.input.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.input.setsockopt(zmq.LINGER, 0)
        self.input.bind(input_addr)
        self.output = self.ctx.socket(zmq.PULL)
        self.output.setsockopt(zmq.LINGER, 0)
        self.output.bind(output_addr)
        # The real endpoints (a tcp port-0 bind picks its port here).
        self.input_addr = str(self.input.getsockopt_string(zmq.LAST_ENDPOINT))
        self.output_addr = str(self.output.getsockopt_string(zmq.LAST_ENDPOINT))
        self.snapshot: zmq.asyncio.Socket | None = None
        if snapshot_addr:
            self.snapshot = self.ctx.socket(zmq.SUB)
            self.snapshot.setsockopt(zmq.LINGER, 0)
            self.snapshot.setsockopt(zmq.SUBSCRIBE, b"")
            self.snapshot.connect(snapshot_addr)
        self.load = LoadTracker(num_engines)
        self.streams: dict[str, RequestStream] = {}
        self.connected: set[int] = set()
        self.dead_engines: dict[int, str] = {}
        self._utility_calls: dict[int, asyncio.Future[bytes]] = {}
        self._call_ids = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Start the background loops (call from inside the running event loop)."""
        self._tasks = [asyncio.create_task(self._output_loop(), name="engine-outputs"),
                       asyncio.create_task(self._hello_loop(), name="engine-hello")]
        if self.snapshot is not None:
            self._tasks.append(asyncio.create_task(self._snapshot_loop(), name="snapshots"))

    async def wait_for_engines(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.connected) < self.num_engines:
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.num_engines)) - self.connected)
                raise EngineUnavailableError(f"engines {missing} never connected")
            await asyncio.sleep(0.01)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.fail_all(EngineUnavailableError("the server is shutting down"))
        self.ctx.destroy(linger=0)

    @property
    def healthy(self) -> bool:
        return not self.dead_engines

    @property
    def num_in_flight(self) -> int:
        return len(self.streams)

    # ---- requests --------------------------------------------------------------------
    def add_request(
        self,
        request: EngineCoreRequest,
        queue: asyncio.Queue[EngineCoreOutput | BaseException] | None = None,
    ) -> RequestStream:
        """Route and send one request. Its outputs (and a failure, if its engine dies) go to
        ``queue`` — pass one queue for several requests to wait on all of them at once."""
        if self.dead_engines:
            raise EngineDeadError(self._dead_reason())
        if request.request_id in self.streams:
            raise ValueError(f"request id {request.request_id!r} is already in flight")
        engine = self.load.pick_and_bump()
        stream = RequestStream(request.request_id, engine)
        if queue is not None:
            stream.queue = queue
        self._send(engine, RequestType.ADD, _encoder.encode(request))
        self.streams[request.request_id] = stream
        return stream

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests still in flight; each goes only to the engine that owns it."""
        per_engine: dict[int, list[str]] = {}
        for rid in request_ids:
            stream = self.streams.pop(rid, None)
            if stream is not None and not stream.finished:
                per_engine.setdefault(stream.engine_index, []).append(rid)
                if not stream.started:
                    stream.started = True
                    self.load.unbump(stream.engine_index)
        for engine, ids in per_engine.items():
            if engine in self.dead_engines:
                continue
            try:
                self._send(engine, RequestType.ABORT, _encoder.encode(ids))
            except EngineUnavailableError as e:
                logger.warning("abort of %d requests not delivered: %s", len(ids), e)

    async def call_utility(self, engine: int, method: str, timeout: float = 10.0) -> bytes:
        call_id = next(self._call_ids)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._utility_calls[call_id] = fut
        try:
            req = UtilityRequest(call_id, method, [self.client_index])
            self._send(engine, RequestType.UTILITY, _encoder.encode(req))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._utility_calls.pop(call_id, None)

    def _send(self, engine: int, kind: RequestType, payload: bytes) -> None:
        try:
            self.input.send_multipart([engine_identity(engine), kind.value, payload],
                                      flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            raise EngineUnavailableError(f"engine {engine} is not reachable: {e}") from e

    # ---- engine failure --------------------------------------------------------------
    def _dead_reason(self) -> str:
        return "; ".join(f"engine {r}: {why}" for r, why in sorted(self.dead_engines.items()))

    def engine_died(self, engine: int, reason: str) -> None:
        """Fail every request that engine owned (the supervisor or the engine told us)."""
        if engine in self.dead_engines:
            return
        self.dead_engines[engine] = reason
        logger.error("engine %d died (%s): failing its requests", engine, reason)
        for rid, stream in list(self.streams.items()):
            if stream.engine_index == engine:
                self.streams.pop(rid, None)
                stream.queue.put_nowait(EngineDeadError(f"engine {engine} died: {reason}"))

    def fail_all(self, error: BaseException) -> None:
        """End every stream in flight with ``error`` and abort them in their engines."""
        streams = list(self.streams.values())
        self.abort([s.request_id for s in streams])
        for stream in streams:
            stream.queue.put_nowait(error)
        self.streams.clear()

    # ---- background loops ------------------------------------------------------------
    async def _hello_loop(self) -> None:
        while True:
            frames = await self.input.recv_multipart()
            if len(frames) == 3 and frames[1] == RequestType.HELLO.value:
                rank = int.from_bytes(frames[0], "little")
                self.connected.add(rank)
                logger.debug("engine %d connected", rank)
            else:
                logger.warning("unexpected message on the request link dropped")

    async def _output_loop(self) -> None:
        while True:
            frame = await self.output.recv()
            try:
                outs = _decoder.decode(frame)
            except msgspec.DecodeError as e:
                logger.warning("dropped a malformed output frame: %s", e)
                continue
            if outs.engine_dead:
                self.engine_died(outs.engine_index, outs.engine_dead)
                continue
            if outs.utility_output is not None:
                fut = self._utility_calls.get(outs.utility_output.call_id)
                if fut is not None and not fut.done():
                    if outs.utility_output.failure:
                        fut.set_exception(RuntimeError(outs.utility_output.failure))
                    else:
                        fut.set_result(outs.utility_output.result)
            for out in outs.outputs:
                stream = self.streams.get(out.request_id)
                if stream is None:
                    continue  # aborted here already, or a dead predecessor's request
                if not stream.started:
                    stream.started = True
                    self.load.unbump(stream.engine_index)
                if out.finished:
                    stream.finished = True
                    del self.streams[out.request_id]
                stream.queue.put_nowait(out)

    async def _snapshot_loop(self) -> None:
        assert self.snapshot is not None
        while True:
            frame = await self.snapshot.recv()
            try:
                self.load.update(decode_snapshot(frame))
            except msgspec.DecodeError as e:
                logger.warning("dropped a malformed load snapshot: %s", e)
