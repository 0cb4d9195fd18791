"""The supervisor's watch over engines: deaths, hangs and silence, and replacement in place.

Called from the supervisor's watch loop about ten times a second (:meth:`EngineWatch.check`).

- A local engine whose process exited (any code, any signal) is replaced: its requests are
  failed and it is routed around at once (``EngineDied(replacing=True)`` to every API
  server, its load forgotten by the coordinator, its gauges marked dead), and a new process
  for the same rank starts; the replacement announces itself to the API servers when ready,
  which route to it again.
- A local engine that is alive but silent — no load report from its busy loop for
  ``engine_heartbeat_timeout`` (engines report at least every second, idle or not) — is
  killed, then replaced as above with cause ``hung``.
- A remote (headless) engine is replaced by its node (:mod:`vserve.launch.headless`): when
  it exits, the node reports it at once (``RemoteEngineExited``) and it is routed around;
  when it goes silent, it is routed around and told ``ShutdownEngine(replace=True)`` (obeyed
  whenever it wakes up). When its replacement says HELLO and is ready, it is routed to again.
- More than ``max_engine_restarts`` replacements within ``RESTART_WINDOW_S`` (0: the
  first death) is a crash loop: the watch returns the reason and the server stops with a
  non-zero exit, as an orchestrator expects.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from vserve.config import ServerConfig
from vserve.launch.coordinator import Coordinator
from vserve.launch.engines import EngineLauncher
from vserve.logging_utils import get_logger
from vserve.metrics.exposition import mark_process_dead
from vserve.protocol.control import EngineDied, ShutdownEngine, ToApiServer
from vserve.roles import engine_name

logger = get_logger(__name__)

RESTART_WINDOW_S = 600.0


def describe_exit(code: int | None) -> tuple[str, str]:
    """(``exited with code N`` / ``was killed by SIGKILL``, metric cause) of a return code."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}", "killed"
    return f"exited with code {code}", "exited"


class EngineWatch:
    def __init__(self, launcher: EngineLauncher, coordinator: Coordinator,
                 server: ServerConfig, tell_api_servers: Callable[[ToApiServer], None]) -> None:
        self.launcher = launcher
        self.coordinator = coordinator
        self.budget = RestartBudget(server.max_engine_restarts)
        self.timeout = server.engine_heartbeat_timeout
        self.tell = tell_api_servers
        self.down: dict[int, str] = {}  # rank → why, until it is ready again
        self._hung: dict[int, str] = {}  # local ranks killed here for silence
        self._failed_start: set[int] = set()
        self._ready_since = {r: time.monotonic() for r in launcher.ready}

    def check(self) -> str | None:
        """Handle whatever happened since the last call; the reason to stop, or None."""
        now = time.monotonic()
        for rank in self.launcher.take_ready():
            self._ready_since[rank] = now
            if self.down.pop(rank, None) is not None:
                logger.info("%s is ready again: routing to it", engine_name(rank))
        for exit_ in self.launcher.take_remote_exits():
            reason = f"{engine_name(exit_.engine_index)} on its node {exit_.reason}"
            logger.error("%s: failing its requests and routing around it (%s)", reason,
                         "its node starts a replacement" if exit_.replacing
                         else "its node does not replace it")
            self._mark_down(exit_.engine_index, reason, exit_.replacing, exit_.pid)
        for rank, error in self.launcher.take_failed():
            # Its process exits next; dead_engines() then reports it.
            logger.error("the replacement of %s failed to start:\n%s", engine_name(rank),
                         error)
            self._failed_start.add(rank)
        for rank, code in self.launcher.dead_engines():
            hung = self._hung.pop(rank, None)
            if hung is not None:
                stop = self._replace(rank, hung, "hung")
            elif rank in self._failed_start:
                self._failed_start.discard(rank)
                stop = self._replace(rank, f"the replacement of {engine_name(rank)} failed "
                                     "to start", "startup_failed")
            else:
                what, cause = describe_exit(code)
                stop = self._replace(rank, f"{engine_name(rank)} {what}", cause)
            if stop:
                return stop
        self._check_heartbeats(now)
        return None

    def _check_heartbeats(self, now: float) -> None:
        local = self.launcher.procs
        for rank in list(self.launcher.ready):
            if rank in self.down or rank in self._hung:
                continue
            seen = self.coordinator.last_seen[rank]
            last = max(seen or 0.0, self._ready_since.get(rank, now))
            if now - last <= self.timeout:
                continue
            reason = (f"{engine_name(rank)} stopped answering (no report from its busy loop "
                      f"for {now - last:.0f}s)")
            if rank in local:
                logger.error("%s: killing it", reason)
                self._hung[rank] = reason
                local[rank].kill()  # dead_engines() sees it next, and it is replaced
            else:
                logger.error("%s: routing around it and telling it to stop (its node "
                             "replaces it)", reason)
                self._mark_down(rank, reason, replacing=True)
                self.launcher.send_to(rank, ShutdownEngine(replace=True))
                self.launcher.forget(rank, "hung")

    def _mark_down(self, rank: int, reason: str, replacing: bool, pid: int = 0) -> None:
        self.down[rank] = reason
        self.coordinator.forget(rank)
        self.tell(EngineDied(rank, reason, replacing, pid or self.launcher.pids.get(rank, 0)))

    def _replace(self, rank: int, reason: str, cause: str) -> str | None:
        proc = self.launcher.procs.get(rank)
        if proc is not None:
            mark_process_dead(proc.pid)  # its gauges disappear; its counters stay
        if not self.budget.take():
            why = f"{reason}; not replaced: {self.budget.exhausted()}"
            logger.error("%s: failing its requests and stopping", why)
            self._mark_down(rank, reason, replacing=False)
            return why
        logger.error("%s: failing its requests, routing around it, starting a replacement "
                     "(%s)", reason, self.budget)
        self._mark_down(rank, reason, replacing=True)
        self._ready_since.pop(rank, None)
        self.launcher.restart(rank, cause)
        return None


class RestartBudget:
    """At most ``max_restarts`` replacements within ``RESTART_WINDOW_S`` (0: none)."""

    def __init__(self, max_restarts: int) -> None:
        self.max_restarts = max_restarts
        self.times: list[float] = []

    def take(self) -> bool:
        """Count one replacement if the budget allows it."""
        now = time.monotonic()
        self.times = [t for t in self.times if now - t < RESTART_WINDOW_S]
        if len(self.times) >= self.max_restarts:
            return False
        self.times.append(now)
        return True

    def exhausted(self) -> str:
        if not self.max_restarts:
            return "--max-engine-restarts is 0"
        return (f"{len(self.times)} engine restarts in the last {RESTART_WINDOW_S / 60:.0f} "
                f"minutes (--max-engine-restarts {self.max_restarts})")

    def __str__(self) -> str:
        return (f"restart {len(self.times)} of {self.max_restarts} allowed in "
                f"{RESTART_WINDOW_S / 60:.0f} minutes")
