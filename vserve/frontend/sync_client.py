"""The blocking adapter of the engine client, for ``LLM``: the caller's thread polls and
receives on the core's sockets; nothing runs in the background."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

import zmq

from vserve.frontend.engine_client import (
    EngineClientCore,
    EngineDeadError,
    EngineUnavailableError,
    Route,
)
from vserve.protocol.outputs import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineDead,
    EngineStats,
    SchedulerStats,
)
from vserve.protocol.requests import EngineCoreRequest

S = TypeVar("S")
_POLL_MS = 1000


class SyncEngineClient(Generic[S]):
    """``check_alive`` runs while waiting (about once a second) and raises when the engine
    process is gone, so that no call waits on a dead engine."""

    def __init__(self, ctx: zmq.Context, num_engines: int, input_addr: str,
                 output_addr: str, check_alive: Callable[[], None]) -> None:
        # No send limit: the caller's own list of prompts bounds what is queued, and a
        # script should wait for the engine to take them, not fail.
        self.core: EngineClientCore[S] = EngineClientCore(ctx, 0, num_engines, input_addr,
                                                          output_addr, send_hwm=0)
        self.check_alive = check_alive
        self._stats: dict[int, SchedulerStats] = {}

    def wait_for_engines(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.core.connected) < self.core.num_engines:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("the engine never connected to its request socket")
            if self.core.input.poll(int(min(left, 1.0) * 1000)):
                self.core.on_request_link(self.core.input.recv_multipart())
            else:
                self.check_alive()

    def add_request(self, request: EngineCoreRequest, sink: S) -> Route[S]:
        """Route ``request``; it is sent with the others at the next :meth:`get_outputs`."""
        return self.core.add_request(request, sink)

    def abort(self, request_ids: list[str]) -> None:
        self._raise_failed(self.core.abort(request_ids))

    @staticmethod
    def _raise_failed(failed: list[tuple[Route[S], EngineUnavailableError]]) -> None:
        if failed:
            raise failed[0][1]

    def get_outputs(self) -> list[tuple[S, EngineCoreOutput]]:
        """Send what was added, then wait for the next step's outputs of known requests
        (RuntimeError when the engine is gone)."""
        self._raise_failed(self.core.flush())
        while True:
            delivered = self._receive()
            if delivered:
                return delivered

    def get_stats(self, engine: int = 0) -> SchedulerStats:
        call_id = self.core.request_stats(engine)
        while call_id not in self._stats:
            self._receive()
        return self._stats.pop(call_id)

    def _receive(self) -> list[tuple[S, EngineCoreOutput]]:
        while not self.core.output.poll(_POLL_MS):
            self.check_alive()
        msg = self.core.decode_output(self.core.output.recv())
        if isinstance(msg, EngineCoreOutputs):
            return self.core.dispatch(msg)
        if isinstance(msg, EngineStats):
            self._stats[msg.call_id] = msg.stats
        elif isinstance(msg, EngineDead):
            self.core.engine_died(msg.engine_index, msg.reason)
            raise EngineDeadError(f"the engine died: {msg.reason}")
        return []

    def close(self) -> None:
        self.core.close()
