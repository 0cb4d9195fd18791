"""Launch primitives with real processes: the shared listening socket, fd hand-off over
SCM_RIGHTS to several uvicorn children, the run dir, parent-death exit, child management and
process-aware logging.

Every process a test starts is stopped in a ``finally`` (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from helpers.sockets import listening_inodes, socket_inodes

from vserve.launch.fd_passing import ListenSocketServer, receive_listen_socket
from vserve.launch.lifetime import spawn_child, terminate_children
from vserve.launch.listen import bind_listen_socket, describe
from vserve.launch.rundir import (
    MAX_IPC_PATH_BYTES,
    ipc_endpoint,
    ipc_path,
    make_run_dir,
    remove_run_dir,
)

REPO = Path(__file__).resolve().parents[2]

# An API-server stand-in: receive the socket, serve a tiny ASGI app that answers its pid.
HTTP_CHILD = r"""
import os, sys
import uvicorn
from vserve.launch.fd_passing import receive_listen_socket
from vserve.launch.lifetime import exit_when_parent_dies

exit_when_parent_dies(poll_interval=0.2)
sock = receive_listen_socket(sys.argv[1], timeout=10.0)
PID = str(os.getpid()).encode()

async def app(scope, receive, send):
    assert scope["type"] == "http"
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(PID)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": PID})

class Server(uvicorn.Server):
    async def startup(self, sockets=None):
        await super().startup(sockets=sockets)
        print("READY", flush=True)  # uvicorn logs nothing when given sockets

config = uvicorn.Config(app, loop=sys.argv[2], http="httptools", lifespan="off",
                        log_level="warning", access_log=False)
Server(config).run(sockets=[sock])
"""


def _wait_line(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> str:
    """The next stdout line of ``proc``; fails the test on timeout or EOF."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"pid {proc.pid}: no output within {timeout}s")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"pid {proc.pid} exited ({proc.poll()}) before writing")
            return line.decode().strip()


def _start_http_children(handoff_path: str, loop: str, n: int) -> list[subprocess.Popen[bytes]]:
    """Start ``n`` API-server stand-ins at once (imports dominate) and wait until each serves.

    Started from the calling (main) thread on purpose: PR_SET_PDEATHSIG would fire when a
    short-lived thread that forked them exited (vserve's spawn_child guards against that).
    """
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(n):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", HTTP_CHILD, handoff_path, loop],
                    stdout=subprocess.PIPE,
                    stdin=subprocess.DEVNULL,
                    cwd=REPO,
                )
            )
        for proc in procs:
            assert _wait_line(proc) == "READY"
    except BaseException:
        terminate_children(procs, timeout=2.0)
        raise
    return procs


def _get(port: int, timeout: float = 5.0) -> int:
    """One request on a fresh connection; returns the pid that answered."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        assert resp.status == 200
        return int(resp.read())
    finally:
        conn.close()






class Cluster:
    """A supervisor stand-in (this test process) and its HTTP children on one socket."""

    def __init__(self, run_dir: Path, loop: str, n: int) -> None:
        self.loop = loop
        self.sock = bind_listen_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.server = ListenSocketServer(self.sock, ipc_path(run_dir, "listen"))
        self.children: list[subprocess.Popen[bytes]] = []
        try:
            self.children = _start_http_children(self.server.path, loop, n)
        except BaseException:
            self.close()
            raise

    def start_child(self) -> subprocess.Popen[bytes]:
        return _start_http_children(self.server.path, self.loop, 1)[0]

    def close(self) -> None:
        terminate_children(self.children, timeout=3.0)
        self.server.close()
        self.sock.close()


@contextlib.contextmanager
def _cluster(loop: str, n: int = 2) -> Iterator[Cluster]:
    run_dir = make_run_dir()
    cluster: Cluster | None = None
    try:
        cluster = Cluster(run_dir, loop, n)
        yield cluster
    finally:
        if cluster is not None:
            cluster.close()
        remove_run_dir(run_dir)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with _cluster("uvloop") as c:
        yield c


def _keepalive_avg_ms(port: int, n: int = 50) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5.0)
    try:
        for i in range(n + 1):
            if i == 1:  # the first request pays for the connection
                start = time.perf_counter()
            conn.request("GET", "/")
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
        return (time.perf_counter() - start) / n * 1000
    finally:
        conn.close()


# ---------------------------------------------------------------------------- the socket itself


def test_bind_ipv4_options() -> None:
    sock = bind_listen_socket("127.0.0.1", 0)
    try:
        assert sock.family == socket.AF_INET
        assert sock.proto == socket.IPPROTO_TCP  # asyncio's TCP_NODELAY depends on it
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert not sock.getblocking()
        assert not os.get_inheritable(sock.fileno())
        port = sock.getsockname()[1]
        assert port != 0 and describe(sock) == f"http://127.0.0.1:{port}"
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            bind_listen_socket("127.0.0.1", port)
    finally:
        sock.close()


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 on this host")
def test_bind_ipv6() -> None:
    sock = bind_listen_socket("::1", 0)
    try:
        assert sock.family == socket.AF_INET6 and sock.proto == socket.IPPROTO_TCP
        port = sock.getsockname()[1]
        assert describe(sock) == f"http://[::1]:{port}"
        with socket.create_connection(("::1", port), timeout=2.0):
            pass
    finally:
        sock.close()
    wild = bind_listen_socket("[::]", 0)  # brackets allowed; dual-stack
    try:
        assert wild.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        with socket.create_connection(("127.0.0.1", wild.getsockname()[1]), timeout=2.0):
            pass
    finally:
        wild.close()


def test_bind_errors_name_the_address() -> None:
    with pytest.raises(ValueError, match="70000"):
        bind_listen_socket("127.0.0.1", 70000)
    with pytest.raises(OSError, match=r"no\.such\.host\.invalid:8000"):
        bind_listen_socket("no.such.host.invalid", 8000)


def test_bind_uds_stale_live_and_foreign(tmp_path: Path) -> None:
    path = str(tmp_path / "http.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays behind, like after a crash
    sock = bind_listen_socket("ignored", 0, uds=path)
    try:
        assert sock.family == socket.AF_UNIX and describe(sock) == f"unix:{path}"
        with pytest.raises(OSError, match="listening"):
            bind_listen_socket("ignored", 0, uds=path)  # never steal a live socket
    finally:
        sock.close()
    regular = tmp_path / "data.txt"
    regular.write_text("keep me")
    with pytest.raises(OSError, match="not a socket"):
        bind_listen_socket("ignored", 0, uds=str(regular))
    assert regular.read_text() == "keep me"


def test_handoff_in_process_tcp_and_uds(tmp_path: Path) -> None:
    run_dir = make_run_dir()
    socks = [
        bind_listen_socket("127.0.0.1", 0),
        bind_listen_socket("", 0, uds=str(tmp_path / "u.sock")),
    ]
    try:
        for i, sock in enumerate(socks):
            with ListenSocketServer(sock, ipc_path(run_dir, f"h{i}")) as server:
                assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
                for _ in range(2):  # served again and again
                    got = receive_listen_socket(server.path, timeout=5.0)
                    try:
                        assert os.fstat(got.fileno()).st_ino == os.fstat(sock.fileno()).st_ino
                        assert got.family == sock.family and describe(got) == describe(sock)
                        assert not os.get_inheritable(got.fileno())  # MSG_CMSG_CLOEXEC
                    finally:
                        got.close()
                assert server.handoffs == 2
            assert not os.path.exists(server.path)  # close() removed its file
        with pytest.raises(TimeoutError, match="no listen-socket server"):
            receive_listen_socket(ipc_path(run_dir, "absent"), timeout=0.2)
    finally:
        for sock in socks:
            sock.close()
        remove_run_dir(run_dir)


# ------------------------------------------------------------- several uvicorn children, one port


def test_exactly_one_listening_socket_shared_by_all(cluster: Cluster) -> None:
    listening = listening_inodes(cluster.port)
    assert len(listening) == 1, listening
    inode = listening[0]
    assert os.fstat(cluster.sock.fileno()).st_ino == inode
    for pid in [os.getpid()] + [c.pid for c in cluster.children]:
        assert inode in socket_inodes(pid), f"pid {pid} does not hold the listening socket"


def test_all_children_answer_under_concurrent_load(cluster: Cluster) -> None:
    want = {c.pid for c in cluster.children}
    seen: set[int] = set()
    deadline = time.monotonic() + 10.0
    with ThreadPoolExecutor(16) as pool:
        while seen != want and time.monotonic() < deadline:
            seen |= set(pool.map(lambda _: _get(cluster.port), range(200)))
    assert seen == want


def test_keepalive_latency_uvloop(cluster: Cluster) -> None:
    avg = _keepalive_avg_ms(cluster.port)
    assert avg < 10.0, f"{avg:.1f} ms per kept-alive request (Nagle + delayed ACK is ~40 ms)"


def test_keepalive_latency_plain_asyncio() -> None:
    # The measured pitfall: 2 asyncio processes on one shared socket. proto=IPPROTO_TCP makes
    # asyncio set TCP_NODELAY on accepted connections.
    with _cluster("asyncio") as c:
        avg = _keepalive_avg_ms(c.port)
    assert avg < 10.0, f"{avg:.1f} ms per kept-alive request"


def test_replacement_child_gets_the_socket_while_port_keeps_answering(cluster: Cluster) -> None:
    stop = threading.Event()
    refused: list[BaseException] = []
    other_errors: list[BaseException] = []
    answered: list[tuple[float, int]] = []  # (when the request started, pid that answered)

    def poll() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                answered.append((started, _get(cluster.port, timeout=5.0)))
            except ConnectionRefusedError as exc:
                refused.append(exc)
            except (OSError, http.client.HTTPException) as exc:
                other_errors.append(exc)

    def pids_since(t: float) -> set[int]:
        return {pid for started, pid in list(answered) if started >= t}

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        time.sleep(0.2)
        victim = cluster.children.pop(0)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=5.0)
        reaped_at = time.monotonic()
        replacement = cluster.start_child()
        cluster.children.append(replacement)
        deadline = time.monotonic() + 10.0
        while replacement.pid not in pids_since(reaped_at) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        poller.join(timeout=10.0)
    assert not refused, "the port closed while an API server was replaced"
    # Only a request the victim had already accepted can fail (the poller is sequential).
    assert len(other_errors) <= 1, other_errors
    after = pids_since(reaped_at)
    assert victim.pid not in after
    assert replacement.pid in after, (after, replacement.pid, len(answered))
    assert listening_inodes(cluster.port) == [os.fstat(cluster.sock.fileno()).st_ino]


# ------------------------------------------------------------------------------------ run dir


def test_run_dir_layout_and_ipc_limits() -> None:
    run_dir = make_run_dir()
    try:
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        for sub in ("ipc", "prometheus"):
            assert stat.S_IMODE((run_dir / sub).stat().st_mode) == 0o700
        assert run_dir.stat().st_uid == os.getuid()
        assert ipc_endpoint(run_dir, "coord_in") == f"ipc://{run_dir}/ipc/coord_in"
        with pytest.raises(ValueError, match=str(MAX_IPC_PATH_BYTES)):
            ipc_endpoint(run_dir, "x" * 120)
        with pytest.raises(ValueError):
            ipc_endpoint(run_dir, "a/b")
    finally:
        remove_run_dir(run_dir)
    assert not run_dir.exists()
    remove_run_dir(run_dir)  # gone already: still no error
    remove_run_dir(None)


# --------------------------------------------------------------------------- process lifetime

ORPHAN = r"""
import signal, sys, time
from vserve.launch.lifetime import exit_when_parent_dies
if sys.argv[1] == "ignore-sigterm":  # PDEATHSIG is then ignored: the poll thread must act
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
exit_when_parent_dies(poll_interval=0.1)
print("ARMED", flush=True)
time.sleep(60)
"""

MIDDLE = r"""
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(child.pid, flush=True)
time.sleep(60)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("mode", ["default", "ignore-sigterm"])
def test_child_exits_when_parent_is_killed(mode: str) -> None:
    middle = subprocess.Popen(
        [sys.executable, "-c", MIDDLE, ORPHAN, mode], stdout=subprocess.PIPE, cwd=REPO
    )
    grandchild = -1
    try:
        grandchild = int(_wait_line(middle))
        assert _wait_line(middle) == "ARMED"
        middle.kill()
        middle.wait(timeout=5.0)
        deadline = time.monotonic() + 5.0
        while not _gone(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(grandchild), "the child outlived its parent"
    finally:
        terminate_children([middle], timeout=1.0)
        if grandchild > 0 and not _gone(grandchild):
            with contextlib.suppress(ProcessLookupError):
                os.kill(grandchild, signal.SIGKILL)


def test_spawn_child_clean_interpreter_same_group_and_env() -> None:
    proc = spawn_child(
        "http.server", ["0", "--bind", "127.0.0.1"], "probe", env={"VSERVE_PROBE": "42"}
    )
    try:
        # Popen returns once exec has begun; the new argv shows up in /proc a moment later.
        deadline = time.monotonic() + 5.0
        while not (cmdline := psutil.Process(proc.pid).cmdline()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cmdline[:2] == [sys.executable, "-c"] and cmdline[3] == "http.server"
        assert os.getpgid(proc.pid) == os.getpgid(0)  # terminal SIGINT reaches it too
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        assert b"VSERVE_PROBE=42" in environ
        assert any(e.startswith(b"PATH=") for e in environ)  # added to, not replaced
        assert os.readlink(f"/proc/{proc.pid}/fd/0") == "/dev/null"
    finally:
        assert terminate_children([proc], timeout=3.0) == []
    assert proc.returncode is not None


def test_spawn_child_from_short_lived_thread_survives_that_thread(tmp_path: Path) -> None:
    # PR_SET_PDEATHSIG fires when the forking *thread* exits; spawn_child forks from a
    # long-lived thread, so a child that arms PDEATHSIG must stay up.
    marker = tmp_path / "armed"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        def start_and_wait_armed() -> None:
            procs.append(spawn_child("helpers.pdeathsig_child", [str(marker)], "c",
                                     env={"PYTHONPATH": str(REPO / "tests")}))
            # The child creates the marker after arming PDEATHSIG: from then on the signal
            # would fire when this thread exits.
            deadline = time.monotonic() + 10.0
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.02)

        worker = threading.Thread(target=start_and_wait_armed)
        worker.start()
        worker.join()
        assert marker.exists()
        time.sleep(0.5)
        assert procs[0].poll() is None, "the child died with the thread that started it"
    finally:
        terminate_children(procs, timeout=3.0)


def test_terminate_children_kills_stragglers_and_never_raises() -> None:
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            " print('up', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        assert _wait_line(stubborn) == "up"
        done.wait(timeout=10.0)
        start = time.monotonic()
        assert terminate_children([stubborn, done], timeout=0.3) == [stubborn.pid]
        assert time.monotonic() - start < 3.0
        assert stubborn.returncode == -signal.SIGKILL
        assert terminate_children([stubborn, done], timeout=0.3) == []  # all gone: no error
    finally:
        with contextlib.suppress(ProcessLookupError):
            stubborn.kill()
        stubborn.wait(timeout=5.0)


LOGGING_CHILD = r"""
from vserve.launch.lifetime import set_process_title
from vserve.logging_utils import get_logger, init_logging
init_logging("ApiServer_1")
init_logging("ApiServer_1", "DEBUG")  # idempotent: still one line per record
get_logger("vserve.api").debug("hello")
get_logger("__main__").info("from main")
set_process_title("ApiServer_1_with_a_long_name")
print(open("/proc/self/comm").read().strip())
"""


def test_logging_format_idempotent_and_process_title() -> None:
    out = subprocess.run(
        [sys.executable, "-c", LOGGING_CHILD], capture_output=True, cwd=REPO, timeout=30
    )
    assert out.returncode == 0, out.stderr.decode()
    lines = out.stderr.decode().splitlines()
    pattern = r"(DEBUG|INFO) \d\d-\d\d \d\d:\d\d:\d\d \(ApiServer_1 pid=\d+\) \[<string>:\d+\] "
    assert len(lines) == 2, lines
    assert re.fullmatch(pattern + "hello", lines[0]), lines[0]
    assert re.fullmatch(pattern + "from main", lines[1]), lines[1]
    assert out.stdout.decode().strip() == "ApiServer_1_wit"  # 15 bytes: the kernel's limit
