"""The front end's end of the engine links, written once for every front end.

:class:`EngineClientCore` is what an API server and an ``LLM`` both do with engines. It binds
the request ROUTER (every engine's DEALER connects, routing id = rank) and the output PULL
(every engine's PUSH connects); it learns which engines are connected from their
``EngineAnnounce``; it routes each request to the least-loaded engine (``LoadTracker``),
remembers which engine owns which request so that aborts go there, and turns each output
frame into ``(sink, output)`` pairs for the requests it knows. Requests routed to an engine
are queued and sent together by :meth:`EngineClientCore.flush` (the asyncio adapter flushes
once per turn of its event loop), so a burst costs one message per engine, not one per
request. It never waits; the adapters own the waiting:

- :class:`AsyncEngineClient` (``vserve.frontend.async_client``, API servers): asyncio loops
  over the same sockets;
- :class:`SyncEngineClient` (``vserve.frontend.sync_client``, ``LLM``): poll and receive in
  the caller's thread.

Invariants:
- A send never blocks and never fails silently: ZMQ queues it at once or it fails at once
  (also on a ``zmq.asyncio`` socket, whose non-blocking send settles its future before
  returning). Requests whose ``AddRequests`` could not be queued come back from
  :meth:`EngineClientCore.flush` with the error, for the adapter to end them.
- On each engine's link, requests queued before an abort or a stats call are sent before it.
- A route (one request in flight) ends exactly once: with its finishing output, with
  :meth:`engine_died` for its engine, or with :meth:`take_all`.
- Outputs for an unknown request (aborted here already, a dead predecessor's) are dropped; a
  message naming an engine this client does not have is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec
import zmq

from vserve import cluster_key
from vserve.frontend.load_tracker import LoadTracker
from vserve.logging_utils import RateLimitedWarning, get_logger
from vserve.protocol import encode
from vserve.protocol.outputs import EngineCoreOutput, EngineCoreOutputs, EngineDead, EngineOutput
from vserve.protocol.requests import (
    AbortRequests,
    AddRequests,
    EngineAnnounce,
    EngineCoreRequest,
    EngineInput,
    GetStats,
    engine_identity,
)

logger = get_logger(__name__)
# What peers send may be garbage, at any rate: warned about at most every 10 s.
_warn_bad_frame = RateLimitedWarning(logger)
_output_decoder = msgspec.msgpack.Decoder(EngineOutput)
_announce_decoder = msgspec.msgpack.Decoder(EngineAnnounce)

S = TypeVar("S")


class EngineDeadError(RuntimeError):
    """The engine that owned a request is gone; the request cannot finish."""


class EngineUnavailableError(RuntimeError):
    """No engine can take a request right now (not connected, queue full, shutting down)."""


@dataclass
class Route(Generic[S]):
    """One request in flight: which engine owns it and where its outputs go."""

    request_id: str
    engine_index: int
    sink: S
    started: bool = False  # an output arrived: the engine is past queueing it


def send_now(sock: zmq.Socket[Any], frames: list[bytes]) -> None:
    """Queue ``frames`` on ``sock`` without blocking, or raise ``zmq.ZMQError`` now.

    A ``zmq.asyncio`` socket returns a future instead of raising; under ``NOBLOCK`` pyzmq
    attempts the send before returning, so the future is already settled: read it here, or a
    full queue's ``zmq.Again`` would vanish into a future nobody awaits.
    """
    result = sock.send_multipart(frames, flags=zmq.NOBLOCK)
    if isinstance(result, asyncio.Future):
        if not result.done():  # only if a blocking send were queued first; none ever is
            result.cancel()
            raise zmq.Again("the send could not be queued at once")
        exc = result.exception()
        if exc is not None:
            raise exc


class EngineClientCore(Generic[S]):
    """Sockets, announcements, routing, ownership and output demultiplexing.

    ``ctx`` is a ``zmq.Context`` or a ``zmq.asyncio.Context``; the adapter receiving on
    :attr:`input` and :attr:`output` must match it. Not thread-safe: one thread (or one event
    loop) uses a core.
    """

    def __init__(self, ctx: zmq.Context[Any], client_index: int, num_engines: int,
                 input_addr: str, output_addr: str, send_hwm: int | None = None) -> None:
        """``send_hwm``: messages queued per engine before a send fails (ZMQ's default
        1000 when None; 0 for no limit, where the caller bounds what it sends)."""
        self.client_index = client_index
        self.num_engines = num_engines
        self.input = ctx.socket(zmq.ROUTER)
        self.input.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unknown peer raises, not drops
        # A replaced engine connects with the identity of the one it replaces.
        self.input.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.input.setsockopt(zmq.LINGER, 0)
        self.input.setsockopt(zmq.MAXMSGSIZE, 1 << 20)  # engines only announce themselves here
        if send_hwm is not None:
            self.input.setsockopt(zmq.SNDHWM, send_hwm)
        self.output = ctx.socket(zmq.PULL)
        self.output.setsockopt(zmq.LINGER, 0)
        try:
            # The real endpoints (a tcp port-0 bind picks its port here).
            self.input_addr = cluster_key.bind(self.input, input_addr)
            self.output_addr = cluster_key.bind(self.output, output_addr)
        except zmq.ZMQError:
            self.input.close(linger=0)
            self.output.close(linger=0)
            raise
        self.load = LoadTracker(num_engines)
        self.routes: dict[str, Route[S]] = {}
        self.connected: set[int] = set()
        self.engine_pids: dict[int, int] = {}  # rank → pid of the process that announced
        self.dead_engines: dict[int, str] = {}
        self._call_ids = itertools.count()
        # Requests routed but not sent yet, per engine (see flush).
        self._unsent: dict[int, list[EngineCoreRequest]] = {}

    # ---- requests out ------------------------------------------------------------------
    @property
    def serving(self) -> set[int]:
        """Engines requests may be routed to: connected and not known dead."""
        return self.connected - self.dead_engines.keys()

    def add_request(self, request: EngineCoreRequest, sink: S) -> Route[S]:
        """Route ``request`` to the least-loaded serving engine and queue it for the next
        :meth:`flush`; its outputs will be paired with ``sink``. Raises
        EngineUnavailableError when no engine serves, ValueError for an id already in
        flight (nothing queued, nothing registered)."""
        if request.request_id in self.routes:
            raise ValueError(f"request id {request.request_id!r} is already in flight")
        serving = self.serving
        if not serving:
            why = self.dead_reason() or "no engine is connected"
            raise EngineUnavailableError(f"no engine is serving ({why})")
        engine = self.load.pick_and_bump(serving)
        route = Route(request.request_id, engine, sink)
        self.routes[request.request_id] = route
        unsent = self._unsent.get(engine)
        if unsent is None:
            self._unsent[engine] = [request]
        else:
            unsent.append(request)
        return route

    @property
    def has_unsent(self) -> bool:
        return bool(self._unsent)

    def flush(self) -> list[tuple[Route[S], EngineUnavailableError]]:
        """Send the queued requests, one ``AddRequests`` per engine. Returns the routes of
        requests that could not be sent (now ended) with the reason, for the caller to
        fail their sinks."""
        if not self._unsent:
            return []
        unsent, self._unsent = self._unsent, {}
        failed: list[tuple[Route[S], EngineUnavailableError]] = []
        for engine, requests in unsent.items():
            try:
                self._send(engine, AddRequests(requests))
            except EngineUnavailableError as e:
                for req in requests:
                    route = self.routes.pop(req.request_id, None)
                    if route is not None:
                        self._mark_started(route)
                        failed.append((route, e))
        return failed

    def abort(self, request_ids: list[str]) -> list[tuple[Route[S], EngineUnavailableError]]:
        """Abort requests still in flight, each at the engine that owns it; unknown or
        finished ids are ignored. Their routes end here (no output reaches a sink after).
        Queued requests are flushed first; returns what that flush could not send."""
        failed = self.flush()
        per_engine: dict[int, list[str]] = {}
        for rid in request_ids:
            route = self.routes.pop(rid, None)
            if route is None:
                continue
            per_engine.setdefault(route.engine_index, []).append(rid)
            self._mark_started(route)
        for engine, ids in per_engine.items():
            if engine in self.dead_engines:
                continue
            try:
                self._send(engine, AbortRequests(ids))
            except EngineUnavailableError as e:
                logger.warning("abort of %d requests not delivered: %s", len(ids), e)
        return failed

    def request_stats(self, engine: int) -> int:
        """Ask ``engine`` for its SchedulerStats; returns the call id its reply carries."""
        call_id = next(self._call_ids)
        self.flush()
        self._send(engine, GetStats(call_id, self.client_index))
        return call_id

    def _send(self, engine: int, msg: EngineInput) -> None:
        try:
            send_now(self.input, [engine_identity(engine), encode(msg)])
        except zmq.ZMQError as e:
            why = "its queue is full" if isinstance(e, zmq.Again) else str(e)
            raise EngineUnavailableError(f"engine {engine} is not reachable: {why}") from e

    # ---- frames in ---------------------------------------------------------------------
    def on_request_link(self, frames: list[bytes]) -> None:
        """A frame on the ROUTER: an engine announcing itself."""
        try:
            if len(frames) != 2:
                raise msgspec.DecodeError(f"{len(frames)} frames, expected 2")
            announce = _announce_decoder.decode(frames[1])
        except msgspec.DecodeError as e:
            _warn_bad_frame("dropped a malformed frame on the request link: %s", e)
            return
        rank = announce.engine_index
        if frames[0] != engine_identity(rank) or not 0 <= rank < self.num_engines:
            _warn_bad_frame("dropped an announcement of unknown engine %d", rank)
            return
        self.connected.add(rank)
        self.engine_pids[rank] = announce.pid
        if self.dead_engines.pop(rank, None) is not None:
            logger.info("engine %d is back: routing to it again", rank)
        logger.debug("engine %d connected", rank)

    def decode_output(self, frame: bytes) -> EngineOutput | None:
        """One output-link frame, decoded; None (logged) for garbage or an unknown engine."""
        try:
            msg = _output_decoder.decode(frame)
        except msgspec.DecodeError as e:
            _warn_bad_frame("dropped a malformed output frame: %s", e)
            return None
        if isinstance(msg, (EngineCoreOutputs, EngineDead)) and not (
                0 <= msg.engine_index < self.num_engines):
            _warn_bad_frame("dropped an output frame from unknown engine %d", msg.engine_index)
            return None
        return msg

    def dispatch(self, outs: EngineCoreOutputs) -> list[tuple[S, EngineCoreOutput]]:
        """Pair each request's output of the step with its sink; a finishing output ends
        its route."""
        delivered: list[tuple[S, EngineCoreOutput]] = []
        routes = self.routes
        for out in outs.unpack():
            route = routes.get(out.request_id)
            if route is None:
                continue
            self._mark_started(route)
            if out.finish_reason is not None:
                del routes[out.request_id]
            delivered.append((route.sink, out))
        return delivered

    def _mark_started(self, route: Route[S]) -> None:
        if not route.started:
            route.started = True
            self.load.unbump(route.engine_index)

    # ---- failures ------------------------------------------------------------------------
    def dead_reason(self) -> str:
        return "; ".join(f"engine {r}: {why}" for r, why in sorted(self.dead_engines.items()))

    def engine_died(self, engine: int, reason: str) -> list[Route[S]]:
        """Record ``engine`` as dead (nothing is routed to it until its replacement
        announces itself); returns (and ends) the routes it owned. A second call for the
        same engine returns nothing."""
        if engine in self.dead_engines:
            return []
        self.dead_engines[engine] = reason
        self.connected.discard(engine)
        self._unsent.pop(engine, None)
        logger.error("engine %d died (%s): failing its requests", engine, reason)
        lost = [r for r in self.routes.values() if r.engine_index == engine]
        for route in lost:
            del self.routes[route.request_id]
        return lost

    def take_all(self) -> list[Route[S]]:
        """End every route, aborting them in their engines; returns them."""
        routes = list(self.routes.values())
        self.abort([r.request_id for r in routes])
        return routes

    def close(self) -> None:
        self.input.close(linger=0)
        self.output.close(linger=0)
