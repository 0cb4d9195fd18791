"""The engine-core process: input thread → busy loop → output thread.

Started as ``python -m vserve.engine.core_proc --handshake ADDR --engine-index R`` (a clean
interpreter: never a fork of the parent's state, never a re-import of a user's ``__main__``).
Life: connect to the supervisor's handshake ROUTER, send HELLO, receive EngineStartupInfo,
load the model, send READY (or the startup error with its traceback), then serve until told
to shut down or the parent dies.

Threads keep (de)serialization and socket I/O off the model's critical path: the input
thread decodes frames into a queue, the busy loop steps the engine, the output thread encodes
and sends. A malformed frame is logged and dropped; it never reaches the engine.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import msgspec
import zmq

from vserve import envs
from vserve.config import EngineConfig
from vserve.engine.coordinator import EngineLoad, encode_load
from vserve.engine.messages import (
    EngineControl,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineHello,
    EngineReady,
    EngineStartupError,
    EngineStartupInfo,
    RequestType,
    UtilityOutput,
    UtilityRequest,
    engine_identity,
)
from vserve.launch.lifetime import exit_when_parent_dies, set_process_title
from vserve.logging_utils import get_logger, init_logging

logger = get_logger(__name__)

_SHUTDOWN = object()
_encoder = msgspec.msgpack.Encoder()
_add_decoder = msgspec.msgpack.Decoder(EngineCoreRequest)
_abort_decoder = msgspec.msgpack.Decoder(list[str])
_utility_decoder = msgspec.msgpack.Decoder(UtilityRequest)
_control_decoder = msgspec.msgpack.Decoder(EngineControl)


class EngineCoreProc:
    def __init__(self, core: Any, info: EngineStartupInfo, ctx: zmq.Context,
                 handshake: zmq.Socket) -> None:
        self.core = core
        self.engine_index = core.engine_index
        self.info = info
        self.ctx = ctx
        self.handshake = handshake
        self.input_queue: queue.Queue[tuple[Any, ...] | object] = queue.Queue()
        self.output_queue: queue.Queue[tuple[int, bytes] | object] = queue.Queue()
        self._stop = threading.Event()
        self._inputs = []
        for addr in info.input_addrs:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, engine_identity(self.engine_index))
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(addr)
            # Announce ourselves: a ROUTER can address a peer only after hearing from it.
            sock.send_multipart([RequestType.HELLO.value, _encoder.encode(self.engine_index)])
            self._inputs.append(sock)
        self._outputs = []
        for addr in info.output_addrs:
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(addr)
            self._outputs.append(sock)
        self._stats_sock = None
        if info.stats_addr:
            self._stats_sock = ctx.socket(zmq.PUSH)
            self._stats_sock.setsockopt(zmq.LINGER, 0)
            self._stats_sock.connect(info.stats_addr)
        self.metrics = None
        if envs.prometheus_multiproc_dir():  # served: one API server exposes every process
            from vserve.metrics.engine_metrics import EngineMetrics

            model = core.config.model
            name = model.served_model_name[0] if model.served_model_name else model.model
            self.metrics = EngineMetrics(name, self.engine_index)
        self._input_thread = threading.Thread(target=self._input_loop, name="engine-input",
                                              daemon=True)
        self._output_thread = threading.Thread(target=self._output_loop, name="engine-output",
                                               daemon=True)

    # ---- threads -----------------------------------------------------------------------
    def _input_loop(self) -> None:
        poller = zmq.Poller()
        for sock in self._inputs:
            poller.register(sock, zmq.POLLIN)
        poller.register(self.handshake, zmq.POLLIN)
        while not self._stop.is_set():
            for sock, _ in poller.poll(200):
                frames = sock.recv_multipart(copy=False)
                if sock is self.handshake:
                    self._handle_control(frames)
                    continue
                try:
                    self.input_queue.put(self._decode(frames))
                except Exception as e:  # noqa: BLE001 - hostile input must not kill us
                    logger.warning("dropped a malformed frame (%d parts): %s", len(frames), e)

    def _decode(self, frames: list[Any]) -> tuple[Any, ...]:
        if len(frames) != 2:
            raise ValueError(f"expected 2 frames, got {len(frames)}")
        kind, payload = bytes(frames[0].buffer), frames[1].buffer
        if kind == RequestType.ADD.value:
            return (RequestType.ADD, _add_decoder.decode(payload))
        if kind == RequestType.ABORT.value:
            return (RequestType.ABORT, _abort_decoder.decode(payload))
        if kind == RequestType.UTILITY.value:
            return (RequestType.UTILITY, _utility_decoder.decode(payload))
        raise ValueError(f"unknown request type {kind!r}")

    def _handle_control(self, frames: list[Any]) -> None:
        try:
            msg = _control_decoder.decode(frames[-1].buffer)
        except Exception as e:  # noqa: BLE001
            logger.warning("dropped a malformed control frame: %s", e)
            return
        if msg.kind == "shutdown":
            self.input_queue.put(_SHUTDOWN)
        elif msg.kind == "client_died":
            self.input_queue.put(("client_died", msg.client_index))
            if 0 <= msg.client_index < len(self._inputs):
                # Announce ourselves again: the DEALER queues this until the replacement
                # binds the same endpoint, whose ROUTER then knows we are there.
                self._inputs[msg.client_index].send_multipart(
                    [RequestType.HELLO.value, _encoder.encode(self.engine_index)])
        else:
            logger.warning("unknown control message %r", msg.kind)

    def _output_loop(self) -> None:
        while True:
            item = self.output_queue.get()
            if item is _SHUTDOWN:
                return
            client: int
            data: bytes
            client, data = item  # type: ignore[misc]
            sock = self._stats_sock if client < 0 else self._outputs[client]
            if sock is None:
                continue
            try:
                # Never block: a dead front end's queue fills up, and one slow peer must not
                # stall the outputs of all others. Its requests are dropped on client_died.
                sock.send(data, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                logger.warning("output to client %d dropped: its queue is full", client)

    def _send(self, client: int, outputs: EngineCoreOutputs) -> None:
        if 0 <= client < len(self._outputs):
            self.output_queue.put((client, _encoder.encode(outputs)))
        else:
            logger.warning("output for unknown client %d dropped", client)

    # ---- busy loop ---------------------------------------------------------------------
    def _handle(self, item: Any) -> bool:
        """Apply one input; False means shut down."""
        if item is _SHUTDOWN:
            return False
        kind, payload = item
        if kind == RequestType.ADD:
            err = self.core.add_request(payload)
            if err is not None:
                self._send(payload.client_index,
                           EngineCoreOutputs(self.engine_index, [err], time.time()))
        elif kind == RequestType.ABORT:
            for client, outs in self.core.abort_requests(payload).items():
                self._send(client, EngineCoreOutputs(self.engine_index, outs, time.time()))
        elif kind == RequestType.UTILITY:
            self._utility(payload)
        elif kind == "client_died":
            n = self.core.abort_client(payload)
            logger.info("front end %d went away: dropped its %d requests", payload, n)
        return True

    def _utility(self, call: UtilityRequest) -> None:
        result: Any = None
        failure = None
        try:
            if call.method == "stats":
                result = self.core.stats()
            elif call.method == "reset_prefix_cache":
                result = self.core.scheduler.kv_cache_manager.reset_prefix_cache()
            elif call.method == "ping":
                result = "pong"
            else:
                failure = f"unknown utility method {call.method!r}"
        except Exception as e:  # noqa: BLE001
            failure = f"{type(e).__name__}: {e}"
        out = UtilityOutput(call.call_id, _encoder.encode(result), failure)
        client = int(call.args[0]) if call.args and isinstance(call.args[0], int) else 0
        self._send(client, EngineCoreOutputs(self.engine_index, [], time.time(),
                                             utility_output=out))

    def run(self) -> None:
        self._input_thread.start()
        self._output_thread.start()
        last_key: tuple[int, int, float] | None = None
        last_stats_time = 0.0
        try:
            running = True
            while running:
                if not self.core.has_unfinished_requests():
                    running = self._handle(self.input_queue.get())
                while running:
                    try:
                        running = self._handle(self.input_queue.get_nowait())
                    except queue.Empty:
                        break
                stepped = False
                if running and self.core.has_unfinished_requests():
                    for client, outs in self.core.step().items():
                        self._send(client, outs)
                    stepped = True
                stats = self.core.stats()
                if self.metrics is not None:
                    self.metrics.update(stats, stepped)
                if self._stats_sock is not None:
                    now = time.monotonic()
                    load = EngineLoad(self.engine_index, stats.num_waiting_reqs,
                                      stats.num_running_reqs, stats.kv_cache_usage,
                                      stats.prompt_tokens_total,
                                      stats.generation_tokens_total,
                                      stats.prefix_cache_queries, stats.prefix_cache_hits)
                    # Routing needs fresh queue depths; the counters can ride along.
                    key = (load.num_waiting, load.num_running, round(load.kv_cache_usage, 3))
                    if key != last_key or now - last_stats_time > 1.0:
                        self.output_queue.put((-1, encode_load(load)))
                        last_key, last_stats_time = key, now
        except BaseException as e:
            logger.exception("engine %d failed", self.engine_index)
            dead = EngineCoreOutputs(self.engine_index, [], time.time(),
                                     engine_dead=f"{type(e).__name__}: {e}")
            for client in range(len(self._outputs)):
                self._send(client, dead)
            raise
        finally:
            self._stop.set()
            self.output_queue.put(_SHUTDOWN)
            self._output_thread.join(timeout=5)


def run_engine(handshake_addr: str, engine_index: int, model_dir: str | None = None) -> int:
    """``model_dir`` overrides the head's path (a headless node resolves its own copy)."""
    init_logging(f"EngineCore_DP{engine_index}")
    set_process_title(f"EngineCore_DP{engine_index}")
    # Poll only (see exit_when_parent_dies): an LLM may start us from a short-lived thread.
    exit_when_parent_dies(use_pdeathsig=False)
    ctx = zmq.Context()
    hs = ctx.socket(zmq.DEALER)
    hs.setsockopt(zmq.LINGER, 2000)
    hs.connect(handshake_addr)
    hs.send(_encoder.encode(EngineHello(engine_index, os.getpid())))
    if not hs.poll(60_000):
        logger.error("no startup info from the supervisor at %s", handshake_addr)
        return 1
    info = msgspec.msgpack.decode(hs.recv(), type=EngineStartupInfo)
    try:
        # Imported here so that a broken torch install is reported through the handshake.
        from vserve.engine.core import EngineCore

        config = EngineConfig.from_msgpack(info.config)
        core = EngineCore(config, Path(model_dir or info.model_dir), engine_index)
        proc = EngineCoreProc(core, info, ctx, hs)
    except BaseException as e:  # noqa: BLE001 - reported to the supervisor, then exit
        logger.error("engine %d failed to start: %s", engine_index, e)
        hs.send(_encoder.encode(EngineStartupError(engine_index, "".join(
            traceback.format_exception(e)))))
        hs.close()
        return 1
    hs.send(_encoder.encode(EngineReady(engine_index, core.num_kv_blocks - 1,
                                        config.cache.block_size, core.max_model_len,
                                        core.max_concurrency)))
    signal.signal(signal.SIGTERM, lambda *_: proc.input_queue.put(_SHUTDOWN))
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    proc.run()
    logger.info("engine %d stopped", engine_index)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vserve-engine-core")
    parser.add_argument("--handshake", required=True)
    parser.add_argument("--engine-index", type=int, default=0)
    parser.add_argument("--model-dir", default=None)
    args = parser.parse_args(argv)
    sys.exit(run_engine(args.handshake, args.engine_index, args.model_dir))


if __name__ == "__main__":
    main()
