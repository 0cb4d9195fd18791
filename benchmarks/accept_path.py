"""Cost of accepting a connection: vserve's BalancedAcceptor against the event loop's own
accept loop (``loop.create_server``), side by side in one run.

A uvloop event loop serves a trivial protocol (answers one line and closes) on a local TCP
socket; a client thread opens ``--connections`` connections one after another, each sending
a line and reading the answer. Reported per connection: the server thread's CPU time (the
accept path plus the tiny protocol) and the client's round trip (connect + request +
answer), median and p99.

    python benchmarks/accept_path.py --connections 5000
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vserve.api.acceptor import BalancedAcceptor  # noqa: E402
from vserve.launch.connections import ConnectionTable  # noqa: E402


class Echo(asyncio.Protocol):
    def __init__(self, on_close: object = None) -> None:
        self.on_close = on_close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"ok\n")  # type: ignore[attr-defined]
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if callable(self.on_close):
            self.on_close()


def serve(mode: str, sock: socket.socket, ready: threading.Event, stop: threading.Event,
          cpu: list[float]) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if mode == "balanced":
            with tempfile.TemporaryDirectory() as d:
                table = ConnectionTable(Path(d) / "t", 2, create=True)
                acceptor = BalancedAcceptor(sock, table, 0, max_open=1 << 16)
                acceptor.start(lambda: Echo(acceptor.connection_closed))
                await run(loop)
                acceptor.stop()
                table.close()
        else:
            server = await loop.create_server(Echo, sock=sock)
            await run(loop)
            server.close()

    async def run(loop: asyncio.AbstractEventLoop) -> None:
        ready.set()
        c0 = time.thread_time()
        while not stop.is_set():
            await asyncio.sleep(0.01)
        cpu.append(time.thread_time() - c0)

    uvloop.run(main())


def measure(mode: str, n: int) -> dict[str, float]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    ready, stop, cpu = threading.Event(), threading.Event(), []
    t = threading.Thread(target=serve, args=(mode, sock, ready, stop, cpu))
    t.start()
    ready.wait()
    rtts = []
    for _ in range(n):
        a = time.perf_counter()
        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(b"hi\n")
        assert c.recv(16) == b"ok\n"
        c.close()
        rtts.append(time.perf_counter() - a)
    stop.set()
    t.join()
    sock.close()
    rtts.sort()
    return {"server_cpu_us_per_conn": 1e6 * cpu[0] / n,
            "rtt_median_us": 1e6 * statistics.median(rtts),
            "rtt_p99_us": 1e6 * rtts[int(0.99 * len(rtts))]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=3000)
    a = p.parse_args()
    print(f"{'accept path':>12} {'server CPU us/conn':>18} {'RTT median us':>14} "
          f"{'RTT p99 us':>11}")
    for mode in ("loop", "balanced", "loop", "balanced"):
        r = measure(mode, a.connections)
        print(f"{mode:>12} {r['server_cpu_us_per_conn']:>18.1f} {r['rtt_median_us']:>14.1f} "
              f"{r['rtt_p99_us']:>11.1f}")


if __name__ == "__main__":
    main()
