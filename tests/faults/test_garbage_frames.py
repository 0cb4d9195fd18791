"""Garbage and oversized frames on every ZMQ socket a running server listens on.

On one machine the sockets are IPC paths in the run dir (0700: only the same user can
reach them); across machines CURVE keeps strangers out (test_link_auth). What is left is a
buggy or compromised local peer: every frame is decoded against its link's type and dropped
when it is not one, and frames larger than a link ever carries are refused by ZMQ itself
(the connection is dropped) before anything is allocated for them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import psutil
import zmq
from helpers.serve import serve

from vserve.launch.rundir import ipc_endpoint

GARBAGE = [b"", b"\x00", b"\xff" * 64, os.urandom(4096), b"\x93\x01\x02\x03",
           b"\x82\xa4kind\xa4dead"]


def _run_dir(pid: int) -> Path:
    for p in psutil.Process(pid).children(recursive=True):
        cmd = p.cmdline()
        if "--args-file" in cmd:
            return Path(cmd[cmd.index("--args-file") + 1]).parent
    raise AssertionError("no API server found")


def _children(pid: int) -> set[int]:
    return {p.pid for p in psutil.Process(pid).children(recursive=True)}


def test_garbage_and_oversized_frames_on_every_socket() -> None:
    with serve("demo", "--api-server-count", "2", "--data-parallel-size", "2") as srv:
        run_dir = _run_dir(srv.pid)
        before = _children(srv.pid)
        # (endpoint, our socket type, a frame size the link never carries)
        targets = [("handshake", zmq.DEALER, 32 << 20), ("stats", zmq.PUSH, 4 << 20)]
        for i in range(2):
            targets += [(f"input-{i}", zmq.DEALER, 4 << 20), (f"output-{i}", zmq.PUSH, None)]
        ctx = zmq.Context()
        try:
            for name, kind, oversize in targets:
                sock = ctx.socket(kind)
                sock.setsockopt(zmq.LINGER, 1000)
                sock.connect(ipc_endpoint(run_dir, name))
                for frame in GARBAGE:
                    sock.send(frame)
                sock.send_multipart([b"a", b"b", b"c"])
                if oversize is not None:
                    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
                    sock.send(b"\x00" * oversize)
                    # The receiver's ZMQ refuses the frame by dropping the connection.
                    assert monitor.poll(10_000), f"{name} took a {oversize}-byte frame"
                    monitor.close()
                sock.close()
            time.sleep(2.0)
        finally:
            ctx.destroy(linger=0)
        # Nothing crashed or was replaced, and everything still serves.
        assert _children(srv.pid) == before
        health = httpx.get(srv.base_url + "/health", timeout=10).json()
        assert health.get("engines_down", []) == [], health
        for i in range(8):
            r = httpx.post(srv.base_url + "/v1/completions",
                           json={"prompt": f"still {i}", "max_tokens": 4},
                           headers={"Connection": "close"}, timeout=30)
            assert r.status_code == 200, r.text
        log = srv.log()
        assert "malformed" in log
        assert "Traceback" not in log
