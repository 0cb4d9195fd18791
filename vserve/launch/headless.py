"""A headless node (``vserve serve --headless``): engines only, joining the head over TCP.

The node starts its engines and watches them. An engine that exits on its own (any code but
0, any signal) is reported to the head at once (``RemoteEngineExited`` on the handshake
link), so the head fails its requests and routes around it without waiting for its
heartbeat timeout, and a new process for the same rank is started here, within the same
``--max-engine-restarts`` budget as the head's; it joins with HELLO like the first one.
An engine the head gave up on (it went silent) exits with ``ENGINE_EXIT_REPLACE`` and is
replaced the same way. An engine that exits 0 was told to by the head: the node exits 0. Past the restart budget the node exits 1 for its orchestrator.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from pathlib import Path

import zmq

from vserve.config import ServeConfig
from vserve.launch.engine_watch import RestartBudget, describe_exit
from vserve.launch.lifetime import spawn_child
from vserve.logging_utils import get_logger
from vserve.protocol import encode
from vserve.protocol.control import ENGINE_EXIT_REPLACE, RemoteEngineExited
from vserve.roles import (
    CLUSTER_KEY_FLAG,
    ENGINE_INDEX_FLAG,
    ENGINE_MODULE,
    LOCAL_ENGINES_FLAG,
    engine_name,
)

logger = get_logger(__name__)


class HeadlessNode:
    def __init__(self, config: ServeConfig, model_dir: Path, handshake_addr: str,
                 ctx: zmq.Context, procs: dict[int, subprocess.Popen[bytes]]) -> None:
        self.ranks = config.parallel.local_ranks
        self.model_dir = model_dir
        self.handshake_addr = handshake_addr
        self.cluster_key_file = config.parallel.cluster_key_file
        self.budget = RestartBudget(config.server.max_engine_restarts)
        self.procs = procs  # the supervisor's, so its shutdown stops them
        self.to_head = ctx.socket(zmq.DEALER)
        self.to_head.setsockopt(zmq.LINGER, 1000)  # a last report gets out before exit
        self.to_head.connect(handshake_addr)

    def _start(self, rank: int) -> None:
        args = ["--handshake", self.handshake_addr, ENGINE_INDEX_FLAG, str(rank),
                LOCAL_ENGINES_FLAG, str(len(self.ranks)), "--model-dir", str(self.model_dir)]
        if self.cluster_key_file:
            args += [CLUSTER_KEY_FLAG, self.cluster_key_file]
        self.procs[rank] = spawn_child(ENGINE_MODULE, args, engine_name(rank))

    def run(self, stop_requested: threading.Event) -> int:
        for rank in self.ranks:
            self._start(rank)
        logger.info("headless: started engines %s joining %s", self.ranks,
                    self.handshake_addr)
        try:
            while not stop_requested.wait(0.2):
                for rank, p in list(self.procs.items()):
                    code = p.poll()
                    if code is None:
                        continue
                    if code == ENGINE_EXIT_REPLACE:  # the head gave up on it (silence)
                        if not self._replace(rank, code, tell_head=False):
                            return 1
                        continue
                    if code == 0:  # the head told it to shut down
                        logger.info("%s stopped; headless node exits", engine_name(rank))
                        return 0
                    if not self._replace(rank, code):
                        return 1
            return 0
        finally:
            self.to_head.close()

    def _replace(self, rank: int, code: int, tell_head: bool = True) -> bool:
        what, cause = describe_exit(code)
        if code == ENGINE_EXIT_REPLACE:
            what, cause = "went silent and the head gave up on it", "hung"
        pid = self.procs[rank].pid
        replacing = self.budget.take()
        if tell_head:
            with contextlib.suppress(zmq.ZMQError):
                self.to_head.send(encode(RemoteEngineExited(rank, what, cause, replacing,
                                                            pid)), flags=zmq.NOBLOCK)
        if not replacing:
            logger.error("%s %s; not replaced: %s; headless node exits", engine_name(rank),
                         what, self.budget.exhausted())
            return False
        logger.error("%s %s: starting a replacement (%s)", engine_name(rank), what,
                     self.budget)
        self._start(rank)
        return True
