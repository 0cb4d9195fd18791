"""A send to an engine queues at once or fails at once — never lost in an unawaited future.

Before, ``AsyncEngineClient`` sent with NOBLOCK on a zmq.asyncio socket: a full queue's
``zmq.Again`` landed in a future nobody awaited, the ADD was dropped, and its client waited
until its own timeout.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from vserve.frontend.engine_client import send_now


def test_a_full_queue_raises_at_the_send(tmp_path: Path) -> None:
    async def main() -> int:
        actx = zmq.asyncio.Context()
        ctx = zmq.Context()
        router = actx.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.SNDHWM, 4)
        router.bind(f"ipc://{tmp_path}/in")
        engine = ctx.socket(zmq.DEALER)  # an engine that never reads
        engine.setsockopt(zmq.IDENTITY, b"e0")
        engine.setsockopt(zmq.RCVHWM, 4)
        engine.connect(f"ipc://{tmp_path}/in")
        engine.send(b"hello")
        await router.recv_multipart()
        sent = 0
        try:
            with pytest.raises(zmq.Again):
                for _ in range(100_000):
                    send_now(router, [b"e0", b"x" * 1000])
                    sent += 1
        finally:
            engine.close(0)
            router.close(0)
            actx.term()
            ctx.term()
        return sent

    loop_errors: list[dict] = []
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    try:
        sent = loop.run_until_complete(main())
        gc.collect()  # an unretrieved future's exception is reported when it is collected
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()
    assert 0 < sent < 100_000
    assert not loop_errors, loop_errors
