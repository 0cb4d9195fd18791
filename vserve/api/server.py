"""One API-server process: ``python -m vserve.api.server --index I --args-file F``.

Started by the supervisor in a clean interpreter. It binds its ZMQ links, says hello to the
supervisor, waits until every engine is ready, receives the shared listening socket over
SCM_RIGHTS and serves HTTP on it with uvicorn. It imports no torch.

Signals: SIGTERM starts a drain (readiness 503, no new requests, in-flight requests finish up
to --shutdown-timeout, then exit); SIGINT is ignored because a terminal's Ctrl-C reaches the
whole process group and the supervisor orders the shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Generator
from pathlib import Path

import msgspec
import uvicorn
import zmq
import zmq.asyncio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vserve.api.acceptor import BalancedAcceptor
from vserve.api.http_guard import HttpLimits, guarded_protocol
from vserve.api.state import ServerState
from vserve.cluster_key import ClusterKey
from vserve.config import ServeConfig
from vserve.frontend.async_client import AsyncEngineClient
from vserve.frontend.engine_client import EngineUnavailableError
from vserve.frontend.generation_defaults import load_sampling_defaults
from vserve.frontend.input_processor import load_eos_token_ids
from vserve.frontend.tokenizer import Tokenizer
from vserve.launch.admission import AdmissionLedger
from vserve.launch.connections import ConnectionTable
from vserve.launch.fd_passing import receive_listen_socket
from vserve.launch.lifetime import (
    exit_when_parent_dies,
    freeze_startup_heap,
    on_parent_death,
    set_process_title,
)
from vserve.launch.rundir import remove_run_dir
from vserve.logging_utils import RateLimitedWarning, get_logger, init_logging
from vserve.metrics.exposition import add_metrics_route, with_http_metrics
from vserve.metrics.request_metrics import declare_series
from vserve.protocol import encode
from vserve.protocol.control import (
    ApiServerArgs,
    ApiServerDrained,
    ApiServerGo,
    ApiServerHello,
    DrainServer,
    EngineDied,
    ExitServer,
    StopServer,
    ToApiServer,
)
from vserve.roles import API_SERVER_INDEX_FLAG, api_server_name

logger = get_logger(__name__)
# What peers send may be garbage, at any rate: warned about at most every 10 s.
_warn_bad_frame = RateLimitedWarning(logger)
_control_decoder = msgspec.msgpack.Decoder(ToApiServer)


class _Server(uvicorn.Server):
    """uvicorn serving the shared listening socket through a ``BalancedAcceptor`` (not its
    own accept loop), without its own signal handlers: this process decides what signals
    mean."""

    def __init__(self, config: uvicorn.Config, acceptor: BalancedAcceptor,
                 limits: HttpLimits) -> None:
        super().__init__(config)
        self.acceptor = acceptor
        self.limits = limits

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # No listeners of uvicorn's own; the acceptor hands connections to its protocol.
        await super().startup(sockets=[])
        protocol = guarded_protocol(self.config.http_protocol_class, self.limits,
                                    self.acceptor)
        config, state = self.config, self.server_state

        def create_protocol() -> asyncio.Protocol:
            return protocol(config=config, server_state=state,  # type: ignore[no-any-return]
                            app_state=self.lifespan.state)

        self.acceptor.start(create_protocol)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.acceptor.stop()
        await super().shutdown(sockets=sockets)


def with_server_header(app: ASGIApp, index: int) -> ASGIApp:
    """Tag every HTTP response with the API server that produced it.

    Operators see which process answered (logs, traces), and tests prove that the N servers
    share the load of one socket.
    """
    header = (b"x-vserve-api-server", str(index).encode())

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await app(scope, receive, send_with_header)

    return wrapped


_UNTRACKED_PATHS = frozenset({"/health", "/ready", "/metrics", "/version"})


def with_in_flight_tracking(app: ASGIApp, state: ServerState) -> ASGIApp:
    """Count HTTP requests until their responses are completely sent (see ``drain``)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in _UNTRACKED_PATHS:
            await app(scope, receive, send)
            return
        state.http_in_flight += 1
        try:
            await app(scope, receive, send)
        finally:
            state.http_in_flight -= 1

    return wrapped


def default_max_connections() -> int:
    """The file-descriptor limit less what the process needs for itself (ZMQ sockets, the
    metrics files, logs)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 65536
    return max(16, soft - 128)


def served_model_names(config: ServeConfig) -> list[str]:
    model = config.engine.model
    return list(model.served_model_name) or [model.model]


async def serve(index: int, args: ApiServerArgs) -> None:
    serve_config = ServeConfig.from_msgpack(args.config)
    model = serve_config.engine.model
    model_dir = Path(args.model_dir)
    tok_dir = Path(model.tokenizer) if model.tokenizer else model_dir
    tokenizer = Tokenizer.from_pretrained(tok_dir, chat_template=model.chat_template)
    _ = tokenizer.max_token_chars  # computed now, not on the first request's time
    vocab_size = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    num_engines = serve_config.parallel.data_parallel_size
    key_file = serve_config.parallel.cluster_key_file
    key = ClusterKey.load(key_file) if serve_config.parallel.multi_node and key_file else None
    client = AsyncEngineClient(index, num_engines, args.input_addrs[index],
                               args.output_addrs[index], args.snapshot_addr, key)
    control = client.ctx.socket(zmq.DEALER)
    control.setsockopt(zmq.LINGER, 0)
    control.connect(args.handshake_addr)
    await control.send(encode(
        ApiServerHello(index, os.getpid(), client.input_addr, client.output_addr)))
    client.start()
    go = _control_decoder.decode(await control.recv())
    assert isinstance(go, ApiServerGo)
    state = ServerState(
        client_index=index, engine_config=serve_config.engine,
        server_config=serve_config.server, engine_client=client, tokenizer=tokenizer,
        model_names=served_model_names(serve_config),
        max_model_len=go.max_model_len, vocab_size=vocab_size,
        eos_token_ids=load_eos_token_ids(model_dir, tokenizer),
        sampling_defaults=load_sampling_defaults(model_dir,
                                                 serve_config.engine.model.generation_config),
    )
    if serve_config.server.max_num_queued_reqs is not None:
        state.admission = AdmissionLedger(args.admission_path,
                                          serve_config.server.api_server_count)
        state.admission.reset(index)
    declare_series(state.model_name)
    await client.wait_for_engines()
    sock = receive_listen_socket(args.fd_socket_path)
    table = ConnectionTable(args.connections_path, serve_config.server.api_server_count)

    from vserve.api.app import build_app

    fastapi_app = build_app(state)
    add_metrics_route(fastapi_app, args.supervisor_pid)
    app = with_server_header(with_in_flight_tracking(with_http_metrics(fastapi_app), state),
                             index)
    # log_config=None keeps our process-named log format on uvicorn's lines too.
    config = uvicorn.Config(app, http="httptools", lifespan="off", access_log=False,
                            log_config=None, backlog=2048,
                            log_level=serve_config.server.uvicorn_log_level,
                            timeout_graceful_shutdown=5)
    server_config = serve_config.server
    limits = HttpLimits(server_config.max_header_bytes, server_config.max_header_count,
                        server_config.http_header_timeout, server_config.http_body_timeout)
    max_open = server_config.max_connections or default_max_connections()
    server = _Server(config, BalancedAcceptor(sock, table, index, max_open), limits)
    loop = asyncio.get_running_loop()
    drain_task: asyncio.Task[None] | None = None

    exit_now = asyncio.Event()

    def start_drain() -> None:
        nonlocal drain_task
        if drain_task is None:
            drain_task = asyncio.create_task(drain(state, server, control, exit_now))

    def start_stop(reason: str) -> None:
        nonlocal drain_task
        if drain_task is not None:
            drain_task.cancel()
        drain_task = asyncio.create_task(stop(state, server, reason))

    loop.add_signal_handler(signal.SIGTERM, start_drain)
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    control_task = asyncio.create_task(control_loop(control, client, start_drain, start_stop,
                                                    exit_now))
    state.ready = True
    freeze_startup_heap()
    logger.info("serving on the shared socket (engines: %d)", num_engines)
    try:
        await server.serve(sockets=[sock])
    finally:
        control_task.cancel()
        client.close()
    logger.info("stopped")


async def control_loop(control: zmq.asyncio.Socket, client: AsyncEngineClient,
                       start_drain: Callable[[], None], start_stop: Callable[[str], None],
                       exit_now: asyncio.Event) -> None:
    while True:
        frame = await control.recv()
        try:
            msg = _control_decoder.decode(frame)
        except msgspec.DecodeError as e:
            _warn_bad_frame("dropped a malformed control frame: %s", e)
            continue
        if isinstance(msg, DrainServer):
            start_drain()
        elif isinstance(msg, ExitServer):
            start_drain()
            exit_now.set()
        elif isinstance(msg, StopServer):
            start_stop(msg.reason)
        elif isinstance(msg, EngineDied):
            client.engine_died(msg.engine_index, msg.reason, msg.replacing, msg.pid)


async def _flush_responses(state: ServerState, timeout: float = 2.0) -> None:
    """Give handlers whose requests just failed a moment to write their error out."""
    deadline = time.monotonic() + timeout
    while state.http_in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def stop(state: ServerState, server: uvicorn.Server, reason: str) -> None:
    """End every request in flight with ``reason`` — a stream gets an error event and
    ``[DONE]``, not a cut connection — then exit."""
    state.draining = True
    left = state.engine_client.num_in_flight
    if left:
        logger.warning("stopping: ending %d requests in flight (%s)", left, reason)
    state.engine_client.fail_all(EngineUnavailableError(reason))
    await _flush_responses(state)
    server.should_exit = True


async def drain(state: ServerState, server: uvicorn.Server, control: zmq.asyncio.Socket,
                exit_now: asyncio.Event) -> None:
    """Refuse new work, let in-flight requests finish, then keep answering 503 until the
    supervisor says every server has drained: a server that left early would reset the
    connections the kernel had already queued for it on the shared socket."""
    state.draining = True
    timeout = state.server_config.shutdown_timeout
    logger.info("draining: %d requests in flight, waiting up to %.0fs",
                state.engine_client.num_in_flight, timeout)
    deadline = time.monotonic() + timeout

    def busy() -> bool:
        return bool(state.engine_client.num_in_flight or state.http_in_flight)

    while busy() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    left = state.engine_client.num_in_flight
    if left:
        logger.warning("shutdown timeout: aborting %d requests still in flight", left)
        state.engine_client.fail_all(
            EngineUnavailableError("the server shut down before the request finished"))
        await _flush_responses(state)  # their handlers now write error events
    await control.send(encode(ApiServerDrained(state.client_index)))
    # The supervisor answers "exit" once all servers drained; don't wait on it forever.
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(exit_now.wait(), timeout=10.0)
    server.should_exit = True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vserve.api.server")
    parser.add_argument(API_SERVER_INDEX_FLAG, dest="index", type=int, required=True)
    parser.add_argument("--args-file", required=True)
    ns = parser.parse_args(argv)
    args = msgspec.msgpack.decode(Path(ns.args_file).read_bytes(), type=ApiServerArgs)
    name = api_server_name(ns.index)
    log_level = ServeConfig.from_msgpack(args.config).server.log_level
    init_logging(name, log_level.upper(), extra_loggers=("uvicorn",))
    set_process_title(name)
    run_dir = Path(ns.args_file).parent
    on_parent_death(lambda: remove_run_dir(run_dir))
    exit_when_parent_dies(parent_pid=args.supervisor_pid)
    try:
        import uvloop

        uvloop.run(serve(ns.index, args))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(ns.index, args))
    sys.exit(0)


if __name__ == "__main__":
    main()
