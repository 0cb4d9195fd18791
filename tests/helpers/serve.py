"""Start a real `vserve serve` for a test and tear it down without leaving anything behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from vserve.roles import process_role

VSERVE = [sys.executable, "-m", "vserve.cli.main", "serve"]
_SERVING = re.compile(r"vserve is serving .* on (http://\S+|unix:\S+)")


class ServeProcess:
    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 cwd: str | os.PathLike[str] | None = None,
                 command: list[str] | None = None) -> None:
        """``command`` replaces ``python -m vserve.cli.main serve`` (e.g. the installed
        ``vserve serve`` script, which does not put the working directory on sys.path)."""
        self.log_path = Path(tempfile.mkstemp(prefix="vserve-test-", suffix=".log")[1])
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen((command or VSERVE) + args, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True, cwd=cwd)
        self.base_url = ""
        self.children: list[psutil.Process] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = _SERVING.search(self.log())
            if m:
                self.base_url = m.group(1)
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"vserve exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        else:
            raise TimeoutError(f"vserve did not start:\n{self.log()}")
        if self.base_url.startswith("http"):
            while time.monotonic() < deadline:
                try:
                    if httpx.get(self.base_url + "/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        self.children = psutil.Process(self.pid).children(recursive=True)
        return self.base_url

    def run_dir(self) -> str:
        """The server's private run directory (from an API server's command line)."""
        for p in self.children:
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if "--args-file" in cmd:
                return os.path.dirname(cmd[cmd.index("--args-file") + 1])
        raise AssertionError("no API server found")

    def process_names(self) -> dict[int, str]:
        """pid → role (``api_server``, ``engine``) of each vserve child."""
        out = {}
        for p in psutil.Process(self.pid).children(recursive=True):
            try:
                found = process_role(p.cmdline())
            except psutil.Error:
                continue
            if found is not None:
                out[p.pid] = found[0]
        return out

    def pids(self, role: str) -> dict[str, int]:
        """index → pid of each live (not zombie) child with ``role`` (``api_server``,
        ``engine``)."""
        out = {}
        for p in psutil.Process(self.pid).children(recursive=True):
            try:
                found = process_role(p.cmdline())
                if found is not None and found[0] == role and \
                        p.status() != psutil.STATUS_ZOMBIE:
                    out[found[1]] = p.pid
            except psutil.Error:
                continue
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill_all()
        self._log.close()
        return self.proc.returncode

    def kill_all(self) -> None:
        procs = [p for p in self.children if p.is_running()]
        try:  # and any started since (replacements, or a node that never served)
            procs += psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass

    def leftovers(self, timeout: float = 10.0) -> list[psutil.Process]:
        """Children still alive after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        alive = list(self.children)
        while time.monotonic() < deadline:
            alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            if not alive:
                return []
            time.sleep(0.1)
        return alive


@contextmanager
def serve(*args: str, env: dict[str, str] | None = None, timeout: float = 120.0,
          cwd: str | os.PathLike[str] | None = None) -> Iterator[ServeProcess]:
    """``with serve("demo", "--api-server-count", "2") as srv: httpx.get(srv.base_url…)``.

    Uses ``--port 0`` unless a port or --uds is given: the real port is read from the log.
    """
    argv = list(args)
    if "--port" not in argv and "--uds" not in argv:
        argv += ["--port", "0"]
    srv = ServeProcess(argv, env, cwd)
    try:
        srv.wait_serving(timeout)
        yield srv
    finally:
        srv.stop()


def run_in_thread(fn, *args):  # type: ignore[no-untyped-def]
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


@dataclass
class StreamResult:
    server: str | None = None  # the API server that answered (x-vserve-api-server)
    chunks: int = 0
    finish_reason: str | None = None
    error: str | None = None  # an SSE error event, or the client-side failure
    done: bool = False  # the stream ended with data: [DONE]


def stream_completion(base: str, max_tokens: int, timeout: float = 60,
                      prompt: str = "tell me a story",
                      started: threading.Semaphore | None = None) -> StreamResult:
    """Stream one greedy completion (``ignore_eos``) and report how it ended. ``started`` is
    released once, at the first token (or when the stream ends without one), so that a test
    can act while every stream is generating (``wait_started``) instead of sleeping."""
    res = StreamResult()
    try:
        return _stream(base, max_tokens, timeout, prompt, res, started)
    finally:
        if started is not None and res.chunks == 0:
            started.release()


def wait_started(started: threading.Semaphore, n: int, timeout: float = 60) -> None:
    """Until ``n`` streams given ``started`` have their first token (or ended)."""
    deadline = time.monotonic() + timeout
    for _ in range(n):
        assert started.acquire(timeout=max(0.0, deadline - time.monotonic())), \
            "streams did not start"


def _stream(base: str, max_tokens: int, timeout: float, prompt: str, res: StreamResult,
            started: threading.Semaphore | None) -> StreamResult:
    try:
        with httpx.Client(timeout=timeout) as c, c.stream(
                "POST", base + "/v1/completions",
                json={"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                      "stream": True, "temperature": 0}) as r:
            res.server = r.headers.get("x-vserve-api-server")
            if r.status_code != 200:
                r.read()
                res.error = f"HTTP {r.status_code}: {r.text}"
                return res
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    res.done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        res.error = event["error"]["message"]
                    else:
                        res.chunks += 1
                        if res.chunks == 1 and started is not None:
                            started.release()
                        res.finish_reason = event["choices"][0]["finish_reason"] or \
                            res.finish_reason
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def free_port() -> int:
    # The test chooses the head's RPC port, as an operator would; vserve itself never
    # picks ports ahead of time.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def two_node_args(key_dir: Path) -> list[str]:
    """Flags both nodes of a 2-engine, 2-node server on 127.0.0.1 share: a fresh RPC port
    and a cluster key file (written here, as an operator would provision it)."""
    import secrets

    key = key_dir / "cluster.key"
    if not key.exists():
        key.write_text(secrets.token_urlsafe(48))
        key.chmod(0o600)
    return ["--data-parallel-size", "2", "--data-parallel-size-local", "1",
            "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port",
            str(free_port()), "--cluster-key-file", str(key)]
