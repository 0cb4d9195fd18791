"""The `vserve serve` parent process: sockets, run dir, children, signals, shutdown order.

It never serves HTTP. Startup: run dir → listening socket → handshake ROUTER → coordinator
(a thread here; it binds where it lives) → N API servers (each binds its links and reports
the real endpoints) → D engines (told those endpoints on HELLO) → every engine READY → GO to
the API servers, which then take the listening socket over SCM_RIGHTS and serve.

Then it watches: an API server that dies is replaced on the same socket (the engines drop
its requests); an engine that dies or hangs is replaced in place while the others serve
(:mod:`vserve.launch.engine_watch`; past ``--max-engine-restarts`` everything stops with a
non-zero exit so an orchestrator restarts the pod). SIGTERM/SIGINT drains: API servers stop taking requests, finish what is in flight (up to
--shutdown-timeout), exit; then engines stop; exit 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import zmq

from vserve import envs
from vserve.cluster_key import ClusterKey, load_or_create, secure_context
from vserve.config import ServeConfig
from vserve.launch.admission import AdmissionLedger
from vserve.launch.connections import ConnectionTable
from vserve.launch.coordinator import Coordinator
from vserve.launch.engine_watch import EngineWatch
from vserve.launch.engines import EngineLauncher, EngineStartupFailed
from vserve.launch.fd_passing import ListenSocketServer
from vserve.launch.headless import HeadlessNode
from vserve.launch.lifetime import set_process_title, spawn_child, terminate_children
from vserve.launch.listen import DEFAULT_BACKLOG, bind_listen_socket, describe
from vserve.launch.rundir import ipc_endpoint, make_run_dir, remove_run_dir
from vserve.logging_utils import get_logger
from vserve.metrics.exposition import mark_process_dead
from vserve.metrics.stats_logger import StatsLogger
from vserve.protocol import encode
from vserve.protocol.control import (
    ApiServerArgs,
    ApiServerDrained,
    ApiServerGo,
    ApiServerHello,
    ClientDied,
    DrainServer,
    EngineReady,
    ExitServer,
    HeadHeartbeat,
    StopServer,
    ToApiServer,
)
from vserve.roles import (
    API_SERVER_INDEX_FLAG,
    API_SERVER_MODULE,
    api_server_name,
)

logger = get_logger(__name__)
_MAX_RESTARTS_PER_MINUTE = 5
_HEAD_HEARTBEAT_S = 1.0


class Supervisor:
    def __init__(self, config: ServeConfig, model_dir: Path) -> None:
        self.config = config
        self.engine_config = config.engine
        self.server = config.server
        self.parallel = config.parallel
        self.model_dir = model_dir
        self.ctx = zmq.Context()
        self.run_dir = make_run_dir()
        # Before any child starts: prometheus_client's multiprocess mode reads it at import.
        envs.set_prometheus_multiproc_dir(self.run_dir / "prometheus")
        self.api_procs: dict[int, subprocess.Popen[bytes]] = {}
        self.api_peers: dict[int, bytes] = {}
        self.restarts: list[float] = []
        self.stop_requested = threading.Event()
        self.exit_code = 0
        self.go: ApiServerGo | None = None
        self.coordinator: Coordinator | None = None
        self.launcher: EngineLauncher | None = None
        self.listen_server: ListenSocketServer | None = None
        self.stats_logger: StatsLogger | None = None
        self.listen_sock: socket.socket | None = None
        self.uds_inode: int | None = None
        self.headless_procs: dict[int, subprocess.Popen[bytes]] = {}
        self.connections: ConnectionTable | None = None
        self.admission: AdmissionLedger | None = None
        self.cluster_key: ClusterKey | None = None
        self.stop_reason = "the server is shutting down"

    # ---- addresses ---------------------------------------------------------------------
    def _addr(self, name: str) -> str:
        if self.parallel.multi_node:
            return f"tcp://{self.parallel.data_parallel_address}:0"
        return ipc_endpoint(self.run_dir, name)

    def _handshake_addr(self) -> str:
        if self.parallel.multi_node:
            p = self.parallel
            return f"tcp://{p.data_parallel_address}:{p.data_parallel_rpc_port}"
        return ipc_endpoint(self.run_dir, "handshake")

    # ---- main --------------------------------------------------------------------------
    def run(self) -> int:
        set_process_title("vserve-supervisor")
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            self._secure_links()
            if self.parallel.headless:
                return self._run_headless()
            return self._run_head()
        except (RuntimeError, OSError, ValueError) as e:
            logger.error("%s", e)
            return 1
        finally:
            self._shutdown()

    def _secure_links(self) -> None:
        """Multi-node: load the cluster key (the head creates it when missing) and make
        this process's links CURVE-authenticated with it."""
        path = self.parallel.cluster_key_file
        if not self.parallel.multi_node or not path:
            return
        if self.parallel.headless:
            key = ClusterKey.load(path)
        else:
            key, created = load_or_create(path)
            if created:
                logger.warning("created the cluster key %s: give headless nodes a copy "
                               "(--cluster-key-file), e.g. as a Kubernetes Secret", path)
        self.cluster_key = key
        secure_context(self.ctx, key, authenticate=not self.parallel.headless)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self.stop_requested.is_set():
            logger.info("received %s: draining", signal.Signals(signum).name)
        self.stop_requested.set()

    def _run_head(self) -> int:
        server, n = self.server, self.server.api_server_count
        sock = bind_listen_socket(server.host, server.port, server.uds, listen=False)
        self.listen_sock = sock
        if server.uds:
            self.uds_inode = os.stat(server.uds).st_ino
        self.listen_server = ListenSocketServer(sock, str(self.run_dir / "listen.sock"))
        self.connections = ConnectionTable(self.run_dir / "connections", n, create=True)
        self.admission = AdmissionLedger(self.run_dir / "admission", n, create=True)
        self.launcher = EngineLauncher(
            ctx=self.ctx, config=self.engine_config, model_dir=self.model_dir,
            handshake_addr=self._handshake_addr(), input_addrs=[], output_addrs=[],
            engine_ranks=self.parallel.local_ranks,
            num_engines=self.parallel.data_parallel_size, supervised=True,
            remote_head_timeout=(self.server.engine_heartbeat_timeout
                                 if self.parallel.multi_node else 0.0),
            cluster_key_file=(self.parallel.cluster_key_file if self.cluster_key else None),
        )
        # Always on, even for one engine: routing and the server-wide queue bound
        # (--max-num-queued-reqs) both read its snapshots.
        self.coordinator = Coordinator(self._addr("stats"), self._addr("snapshots"),
                                       self.parallel.data_parallel_size,
                                       key=self.cluster_key)
        threading.Thread(target=self.coordinator.run, name="coordinator", daemon=True).start()
        self.launcher.stats_addr = self.coordinator.stats_in_addr
        snapshot_addr = self.coordinator.snapshot_out_addr
        self.api_args = ApiServerArgs(
            config=self.config.to_msgpack(), model_dir=str(self.model_dir), handshake_addr=self.launcher.handshake_addr,
            fd_socket_path=self.listen_server.path,
            connections_path=str(self.connections.path),
            admission_path=str(self.admission.path),
            input_addrs=[self._addr(f"input-{i}") for i in range(n)],
            output_addrs=[self._addr(f"output-{i}") for i in range(n)],
            snapshot_addr=snapshot_addr, supervisor_pid=os.getpid())
        self._write_api_args()
        for i in range(n):
            self._start_api_server(i)
        # Each API server reports its real endpoints before any engine is told where to go.
        hellos = self._collect_api_hellos(n)
        self.api_args.input_addrs = [hellos[i].input_addr for i in range(n)]
        self.api_args.output_addrs = [hellos[i].output_addr for i in range(n)]
        self._write_api_args()  # replacements rebind the same endpoints
        self.launcher.set_front_ends(self.api_args.input_addrs, self.api_args.output_addrs)
        self.launcher.start_processes()
        try:
            ready = self._wait_engines_ready()
        except EngineStartupFailed as e:
            logger.error("%s", e)
            return 1
        coordinator = self.coordinator
        self.stats_logger = StatsLogger(lambda: list(coordinator.loads),
                                        self.server.log_stats_interval)
        self.stats_logger.start()
        self.go = ApiServerGo(max_model_len=min(r.max_model_len for r in ready.values()),
                              num_kv_blocks=[ready[r].num_kv_blocks for r in sorted(ready)])
        # Only now: until every engine is ready a connection is refused, not left waiting.
        sock.listen(DEFAULT_BACKLOG)
        for i in range(n):
            self._send_api(i, self.go)
        engines = self.parallel.data_parallel_size
        logger.info("vserve is serving %s on %s with %d API server%s and %d engine%s",
                    self.engine_config.model.served_name, describe(sock), n,
                    "" if n == 1 else "s", engines, "" if engines == 1 else "s")
        return self._watch()

    def _run_headless(self) -> int:
        """Engines only, joining the head node's handshake over TCP."""
        node = HeadlessNode(self.config, self.model_dir, self._handshake_addr(), self.ctx,
                            self.headless_procs)
        return node.run(self.stop_requested)

    # ---- API servers -------------------------------------------------------------------
    def _write_api_args(self) -> None:
        path = self.run_dir / "api_server_args.msgpack"
        path.write_bytes(encode(self.api_args))
        self.api_args_path = path

    def _start_api_server(self, index: int) -> None:
        self.api_procs[index] = spawn_child(
            API_SERVER_MODULE,
            [API_SERVER_INDEX_FLAG, str(index), "--args-file", str(self.api_args_path)],
            api_server_name(index))

    def _send_api(self, index: int, msg: ToApiServer) -> None:
        peer = self.api_peers.get(index)
        if peer is None or self.launcher is None:
            return
        try:
            self.launcher.sock.send_multipart([peer, encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.warning("message to %s not delivered: %s", api_server_name(index), e)

    def _collect_api_hellos(self, n: int, timeout: float = 120.0) -> dict[int, ApiServerHello]:
        assert self.launcher is not None
        hellos: dict[int, ApiServerHello] = {}
        deadline = time.monotonic() + timeout
        while len(hellos) < n:
            self._check_api_alive_during_startup()
            if time.monotonic() > deadline:
                raise RuntimeError("API servers did not start in time")
            for peer, msg in self.launcher.poll_other(100):
                if isinstance(msg, ApiServerHello):
                    hellos[msg.client_index] = msg
                    self.api_peers[msg.client_index] = peer
        return hellos

    def _check_api_alive_during_startup(self) -> None:
        for i, p in self.api_procs.items():
            if p.poll() is not None:
                raise RuntimeError(
                    f"{api_server_name(i)} exited with code {p.returncode} at startup")
        if self.stop_requested.is_set():
            raise RuntimeError("interrupted during startup")

    def _wait_engines_ready(self) -> dict[int, EngineReady]:
        assert self.launcher is not None
        launcher = self.launcher

        def check() -> None:
            self._check_api_alive_during_startup()

        return launcher.wait_ready(timeout=envs.engine_ready_timeout(), on_poll=check)

    # ---- watching ----------------------------------------------------------------------
    def _watch(self) -> int:
        assert self.launcher is not None and self.coordinator is not None
        launcher = self.launcher
        watch = EngineWatch(launcher, self.coordinator, self.server, self._tell_api_servers)
        last_beat = float("-inf")
        while True:
            if self.stop_requested.is_set():
                return self._drain()
            for peer, msg in launcher.poll_other(100):
                if isinstance(msg, ApiServerHello):  # a replacement came up
                    self.api_peers[msg.client_index] = peer
                    if self.go is not None:
                        self._send_api(msg.client_index, self.go)
            stop = watch.check()
            if stop is not None:
                self.stop_reason = f"the server is stopping: {stop}"
                time.sleep(envs.engine_death_grace())  # the errors reach the clients
                return 1
            now = time.monotonic()
            if now - last_beat >= _HEAD_HEARTBEAT_S:
                launcher.send_control(HeadHeartbeat())
                last_beat = now
            for i, p in list(self.api_procs.items()):
                if p.poll() is not None:
                    self._replace_api_server(i, p.returncode)
                else:
                    self._kill_if_hung(i, p)

    def _kill_if_hung(self, index: int, proc: subprocess.Popen[bytes]) -> None:
        """An API server whose event loop stopped beating (stopped, deadlocked, stuck in a
        long computation) holds its connections without answering: kill it, and the next
        turn replaces it like any dead one."""
        age = self.connections.heartbeat_age(index) if self.connections else None
        limit = self.server.api_server_heartbeat_timeout
        if age is not None and age > limit:
            logger.error("%s has not answered for %.0fs (limit %gs): killing it",
                         api_server_name(index), age, limit)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def _tell_api_servers(self, msg: ToApiServer) -> None:
        for i in self.api_procs:
            self._send_api(i, msg)

    def _replace_api_server(self, index: int, code: int | None) -> None:
        assert self.launcher is not None
        logger.error("%s exited with code %s: starting a replacement", api_server_name(index),
                     code)
        mark_process_dead(self.api_procs[index].pid)
        if self.connections is not None:
            self.connections.mark_absent(index)  # the others stop deferring to it
        if self.admission is not None:
            self.admission.reset(index)  # the engines abort its requests (ClientDied)
        self.launcher.send_control(ClientDied(index))
        self.api_peers.pop(index, None)
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < 60] + [now]
        if len(self.restarts) > _MAX_RESTARTS_PER_MINUTE:
            logger.error("API servers keep dying; stopping")
            self.exit_code = 1
            self.stop_requested.set()
            return
        self._start_api_server(index)

    def _drain(self) -> int:
        assert self.launcher is not None
        for i in self.api_procs:
            self._send_api(i, DrainServer())
        deadline = time.monotonic() + self.server.shutdown_timeout + 5
        drained: set[int] = set()
        while len(drained) < len(self.api_procs) and time.monotonic() < deadline:
            for _, msg in self.launcher.poll_other(50):
                if isinstance(msg, ApiServerDrained):
                    drained.add(msg.client_index)
            drained |= {i for i, p in self.api_procs.items() if p.poll() is not None}
        for i in self.api_procs:
            self._send_api(i, ExitServer())
        deadline = time.monotonic() + 15
        for p in self.api_procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return self.exit_code

    def _stop_api_servers(self, reason: str, timeout: float = 5.0) -> None:
        """Tell every API server to end its requests with ``reason`` and exit, and wait
        for them: a stream gets its error event and ``[DONE]`` before the connection
        closes (a drain has let them exit already)."""
        live = {i: p for i, p in self.api_procs.items() if p.poll() is None}
        for i in live:
            self._send_api(i, StopServer(reason))
        deadline = time.monotonic() + timeout
        for p in live.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))

    def _shutdown(self) -> None:
        if self.stats_logger is not None:
            self.stats_logger.stop()
        self._stop_api_servers(self.stop_reason)
        terminate_children(self.api_procs.values(), timeout=5)
        if self.launcher is not None:
            self.launcher.shutdown(timeout=5)
        if self.headless_procs:
            terminate_children(self.headless_procs.values(), timeout=5)
        if self.coordinator is not None:
            self.coordinator.stop()
        if self.listen_server is not None:
            self.listen_server.close()
        if self.listen_sock is not None:
            self.listen_sock.close()
        uds = self.server.uds
        if uds and self.uds_inode is not None:
            # Remove our socket file, but never one a newer server has bound since.
            with contextlib.suppress(OSError):
                if os.stat(uds).st_ino == self.uds_inode:
                    os.unlink(uds)
        self.ctx.destroy(linger=0)
        remove_run_dir(self.run_dir)
        logger.info("stopped")
