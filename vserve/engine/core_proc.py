"""The engine-core process: input thread → busy loop → output thread.

Started as ``python -m vserve.engine.core_proc --handshake ADDR --engine-index R`` (a clean
interpreter: never a fork of the parent's state, never a re-import of a user's ``__main__``).
Life: connect to the supervisor's handshake ROUTER, send HELLO, receive EngineStartupInfo,
load the model, send READY (or the startup error with its traceback), then serve until told
to shut down or the parent dies.

Threads keep socket I/O and decoding off the model's critical path: the input thread decodes
frames into a queue of typed messages (``EngineQueueItem``), the busy loop applies them and
steps the engine, the output thread sends what the loop encoded. A malformed frame is logged
and dropped; it never reaches the engine.
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
from vserve.cluster_key import ClusterKey, ClusterKeyError, secure_context
from vserve.config import EngineConfig
from vserve.launch.cpus import engine_cpu_threads, usable_cpus
from vserve.launch.lifetime import (
    exit_when_parent_dies,
    flush_and_exit,
    freeze_startup_heap,
    set_process_title,
)
from vserve.logging_utils import RateLimitedWarning, get_logger, init_logging
from vserve.protocol import encode
from vserve.protocol.control import (
    ENGINE_EXIT_REPLACE,
    ClientDied,
    EngineHello,
    EngineReady,
    EngineStartupError,
    EngineStartupInfo,
    HeadHeartbeat,
    ShutdownEngine,
    ToEngine,
)
from vserve.protocol.load import EngineLoad
from vserve.protocol.outputs import EngineCoreOutputs, EngineDead, EngineStats
from vserve.protocol.requests import (
    AbortRequests,
    AddRequests,
    EngineAnnounce,
    EngineInput,
    GetStats,
    engine_identity,
)
from vserve.roles import CLUSTER_KEY_FLAG, ENGINE_INDEX_FLAG, LOCAL_ENGINES_FLAG, engine_name

logger = get_logger(__name__)
# What peers send may be garbage, at any rate: warned about at most every 10 s.
_warn_bad_frame = RateLimitedWarning(logger)

_input_decoder = msgspec.msgpack.Decoder(EngineInput)
_control_decoder = msgspec.msgpack.Decoder(ToEngine)

# What the busy loop takes from its input queue: the request link's messages and the
# supervisor's control messages, exactly as they were decoded.
EngineQueueItem = AddRequests | AbortRequests | GetStats | ClientDied | ShutdownEngine
# What the output thread sends: (client index, encoded frame); client -1 is the coordinator.
_OutputItem = tuple[int, bytes]
_LOAD_INTERVAL_S = 0.005
_IDLE_WAKE_S = 1.0
_METRICS_INTERVAL_S = 0.1


class EngineCoreProc:
    def __init__(self, core: Any, info: EngineStartupInfo, ctx: zmq.Context,
                 handshake: zmq.Socket) -> None:
        self.core = core
        self.engine_index = core.engine_index
        self.info = info
        self.ctx = ctx
        self.handshake = handshake
        self.input_queue: queue.Queue[EngineQueueItem] = queue.Queue()
        self.output_queue: queue.Queue[_OutputItem | None] = queue.Queue()  # None: stop
        self._stop = threading.Event()
        self._announce = encode(EngineAnnounce(self.engine_index, os.getpid()))
        self._head_seen = time.monotonic()
        self.exit_code = 0
        self._last_load_key: tuple[int, int] | None = None
        self._last_load_time = float("-inf")
        self._last_metrics_time = float("-inf")
        self._inputs = []
        for addr in info.input_addrs:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, engine_identity(self.engine_index))
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(addr)
            # Announce ourselves: a ROUTER can address a peer only after hearing from it.
            sock.send(self._announce)
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

            self.metrics = EngineMetrics(core.config.model.served_name, self.engine_index,
                                         info.restarted_because, core.cache_info())
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
        head_timeout = self.info.head_timeout
        last_poll = time.monotonic()
        while not self._stop.is_set():
            events = poller.poll(200)
            now = time.monotonic()
            if now - last_poll > 2.0:
                # This process itself was stopped (SIGSTOP, a frozen VM): what the head sent
                # meanwhile is still on its way in, a ShutdownEngine among it perhaps.
                self._head_seen = now
            last_poll = now
            if not events and head_timeout and now - self._head_seen > head_timeout:
                # A remote engine has no parent on the head's machine to follow.
                logger.error("no heartbeat from the head for %.0fs: it is gone; exiting",
                             head_timeout)
                flush_and_exit(1)
            for sock, _ in events:
                frames = sock.recv_multipart(copy=False)
                if sock is self.handshake:
                    self._head_seen = time.monotonic()
                    self._handle_control(frames)
                    continue
                try:
                    if len(frames) != 1:
                        raise ValueError(f"expected 1 frame, got {len(frames)}")
                    self.input_queue.put(_input_decoder.decode(frames[0].buffer))
                except Exception as e:  # noqa: BLE001 - hostile input must not kill us
                    _warn_bad_frame("dropped a malformed frame (%d parts): %s", len(frames), e)

    def _handle_control(self, frames: list[Any]) -> None:
        try:
            msg = _control_decoder.decode(frames[-1].buffer)
        except Exception as e:  # noqa: BLE001
            _warn_bad_frame("dropped a malformed control frame: %s", e)
            return
        if isinstance(msg, HeadHeartbeat):
            return
        if isinstance(msg, (ClientDied, ShutdownEngine)):
            self.input_queue.put(msg)
        if isinstance(msg, ClientDied) and 0 <= msg.client_index < len(self._inputs):
            # Announce ourselves again: the DEALER queues this until the replacement binds
            # the same endpoint, whose ROUTER then knows we are there.
            self._inputs[msg.client_index].send(self._announce)

    def _output_loop(self) -> None:
        while True:
            item = self.output_queue.get()
            if item is None:
                return
            client, data = item
            sock = self._stats_sock if client < 0 else self._outputs[client]
            if sock is None:
                continue
            try:
                # Never block: a dead front end's queue fills up, and one slow peer must not
                # stall the outputs of all others. Its requests are dropped on ClientDied.
                sock.send(data, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                logger.warning("output to client %d dropped: its queue is full", client)

    def _send(self, client: int, msg: EngineCoreOutputs | EngineStats | EngineDead) -> None:
        if 0 <= client < len(self._outputs):
            self.output_queue.put((client, encode(msg)))
        else:
            logger.warning("output for unknown client %d dropped", client)

    # ---- busy loop ---------------------------------------------------------------------
    def _report(self, idle: bool = False) -> None:
        """Load to the coordinator and engine gauges to Prometheus, rate-limited.

        The coordinator publishes at most every 100 ms, so a load report goes out when the
        queue depths changed and at least ``_LOAD_INTERVAL_S`` passed, and every second
        regardless; gauges and counters are written every ``_METRICS_INTERVAL_S`` (a scrape
        reads them every few seconds). Reading the stats costs a few microseconds; at
        thousands of steps a second this keeps it off the per-step path. ``idle``: the loop
        is about to block for input, so whatever changed is reported now (nothing else
        would report it until the next request).
        """
        now = time.monotonic()
        sched = self.core.scheduler
        key = (sched.num_waiting, sched.num_running)
        changed = key != self._last_load_key
        if self._stats_sock is not None and (
                (changed and (idle or now - self._last_load_time >= _LOAD_INTERVAL_S))
                or now - self._last_load_time >= 1.0):
            stats = self.core.stats()
            self._last_load_key, self._last_load_time = key, now
            self.output_queue.put((-1, encode(EngineLoad(
                self.engine_index, stats.num_waiting_reqs, stats.num_running_reqs,
                stats.kv_cache_usage, stats.prompt_tokens_total, stats.generation_tokens_total,
                stats.prefix_cache_queries, stats.prefix_cache_hits))))
        if self.metrics is not None and (
                idle or now - self._last_metrics_time >= _METRICS_INTERVAL_S):
            self._last_metrics_time = now
            self.metrics.update(self.core.stats())

    def _handle(self, item: EngineQueueItem) -> bool:
        """Apply one input; False means shut down."""
        if isinstance(item, AddRequests):
            for req in item.requests:
                err = self.core.add_request(req)
                if err is not None:
                    self._send(req.client_index,
                               EngineCoreOutputs(self.engine_index, finished=[err]))
        elif isinstance(item, AbortRequests):
            for client, outs in self.core.abort_requests(item.request_ids).items():
                self._send(client, outs)
        elif isinstance(item, GetStats):
            self._send(item.client_index, EngineStats(item.call_id, self.core.stats()))
        elif isinstance(item, ClientDied):
            n = self.core.abort_client(item.client_index)
            logger.info("front end %d went away: dropped its %d requests", item.client_index, n)
        elif isinstance(item, ShutdownEngine):
            self.exit_code = ENGINE_EXIT_REPLACE if item.replace else 0
            return False
        return True

    def run(self) -> None:
        self._input_thread.start()
        self._output_thread.start()
        core, inputs = self.core, self.input_queue
        try:
            running = True
            while running:
                if not core.has_unfinished_requests():
                    self._report(idle=True)  # before blocking: everyone sees the idle state
                    try:
                        # Wake every second even when idle: the load report is also this
                        # loop's heartbeat (a stuck loop must go silent).
                        running = self._handle(inputs.get(timeout=_IDLE_WAKE_S))
                    except queue.Empty:
                        continue
                while running:
                    try:
                        running = self._handle(inputs.get_nowait())
                    except queue.Empty:
                        break
                if running and core.has_unfinished_requests():
                    for client, outs in core.step().items():
                        self._send(client, outs)
                    if self.metrics is not None:
                        self.metrics.observe_step(core.scheduler.last_num_scheduled_tokens)
                    self._report()
        except BaseException as e:
            logger.exception("engine %d failed", self.engine_index)
            dead = EngineDead(self.engine_index, f"{type(e).__name__}: {e}")
            for client in range(len(self._outputs)):
                self._send(client, dead)
            raise
        finally:
            self._stop.set()
            self.output_queue.put(None)
            self._output_thread.join(timeout=5)


def size_cpu_threads(config: EngineConfig, local_engines: int) -> None:
    """Give torch this engine's share of the node's CPUs (``launch.cpus``), unless
    ``--cpu-threads`` or ``$OMP_NUM_THREADS`` says otherwise. Before any torch work: the
    inter-op pool can only be sized first."""
    import torch

    threads = config.device.cpu_threads
    source = "--cpu-threads"
    if threads is None and envs.omp_num_threads() is not None:
        threads, source = envs.omp_num_threads(), "$OMP_NUM_THREADS"
    if threads is None:
        cpus = usable_cpus()
        # Each tensor-parallel rank is a process of its own computing alongside this one.
        tp = config.device.tensor_parallel_size
        threads = engine_cpu_threads(local_engines * tp, cpus)
        source = (f"{cpus} usable CPU{'s' if cpus != 1 else ''} less one for the front end, "
                  f"{local_engines} engine{'s' if local_engines != 1 else ''} on this node"
                  + (f" × {tp} tensor-parallel ranks" if tp > 1 else ""))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(min(threads, 2))
    except RuntimeError:  # already sized (an earlier engine in this process, tests)
        pass
    logger.info("CPU threads: %d (%s)", threads, source)


def run_engine(handshake_addr: str, engine_index: int, model_dir: str | None = None,
               supervised: bool = False, cluster_key_file: str | None = None,
               local_engines: int = 1) -> int:
    """``model_dir`` overrides the head's path (a headless node resolves its own copy).

    ``supervised``: started by ``vserve serve``, whose supervisor orders the shutdown
    (``ShutdownEngine`` once every API server has drained). SIGTERM is then ignored: sent to
    the whole process group (systemd, some container runtimes), it would otherwise stop the
    engine first and strand the requests the API servers are draining. Unsupervised (an
    ``LLM``'s engine), SIGTERM stops it.
    """
    name = engine_name(engine_index)
    init_logging(name)
    set_process_title(name)
    # Poll only (see exit_when_parent_dies): an LLM may start us from a short-lived thread.
    exit_when_parent_dies(use_pdeathsig=False)
    ctx = zmq.Context()
    if cluster_key_file:  # multi-node: every link is a CURVE client holding the key
        try:
            secure_context(ctx, ClusterKey.load(cluster_key_file), authenticate=False)
        except ClusterKeyError as e:
            logger.error("%s", e)
            return 1
    hs = ctx.socket(zmq.DEALER)
    hs.setsockopt(zmq.LINGER, 2000)
    hs.connect(handshake_addr)
    hs.send(encode(EngineHello(engine_index, os.getpid())))
    if not hs.poll(60_000):
        logger.error("no startup info from the supervisor at %s", handshake_addr)
        return 1
    info = _control_decoder.decode(hs.recv())
    if not isinstance(info, EngineStartupInfo):
        logger.error("expected startup info from the supervisor, got %s", type(info).__name__)
        return 1
    try:
        # Imported here so that a broken torch install is reported through the handshake.
        from vserve.engine.core import EngineCore

        config = EngineConfig.from_msgpack(info.config)
        size_cpu_threads(config, local_engines)
        core = EngineCore(config, Path(model_dir or info.model_dir), engine_index)
        proc = EngineCoreProc(core, info, ctx, hs)
    except BaseException as e:  # noqa: BLE001 - reported to the supervisor, then exit
        logger.error("engine %d failed to start: %s", engine_index, e)
        hs.send(encode(EngineStartupError(engine_index, "".join(
            traceback.format_exception(e)))))
        hs.close()
        return 1
    hs.send(encode(EngineReady(engine_index, core.num_kv_blocks - 1, config.cache.block_size,
                               core.max_model_len, core.max_concurrency)))
    if supervised:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: proc.input_queue.put(ShutdownEngine()))
    # Ctrl-C in a terminal reaches the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    freeze_startup_heap()
    proc.run()
    core.runner.shutdown()
    logger.info("engine %d stopped", engine_index)
    return proc.exit_code


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vserve-engine-core")
    parser.add_argument("--handshake", required=True)
    parser.add_argument(ENGINE_INDEX_FLAG, dest="engine_index", type=int, default=0)
    parser.add_argument("--model-dir", default=None)
    parser.add_argument(CLUSTER_KEY_FLAG, dest="cluster_key_file", default=None)
    parser.add_argument(LOCAL_ENGINES_FLAG, dest="local_engines", type=int, default=1)
    parser.add_argument("--supervised", action="store_true",
                        help="started by vserve serve: ignore SIGTERM (see run_engine)")
    args = parser.parse_args(argv)
    sys.exit(run_engine(args.handshake, args.engine_index, args.model_dir, args.supervised,
                        args.cluster_key_file, args.local_engines))


if __name__ == "__main__":
    main()
