"""Starting, naming, watching and stopping vserve's child processes.

Invariants:
- Children are fresh interpreters (``sys.executable -m MODULE``), never forks of the
  supervisor: no inherited threads, locks, CUDA state or re-imported ``__main__``.
- Children stay in the supervisor's process group (no ``start_new_session``): Ctrl-C on the
  terminal reaches every process at once, which is what a user expects, and the supervisor
  forwards SIGTERM/SIGINT to them anyway for signals sent to it alone (e.g. by Kubernetes).
  A child that must survive the group's SIGINT handles it (uvicorn does: graceful shutdown).
- A child never outlives the supervisor: :func:`exit_when_parent_dies` arms PR_SET_PDEATHSIG
  (immediate, but useless if the child ignores SIGTERM or handles it slowly) and a polling
  thread (0.5 s, works whatever the child does with SIGTERM) that ``os._exit``s once the
  parent is gone.
- PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process. So
  :func:`spawn_child` forks only from the main thread or from one daemon spawner thread that
  lives as long as the process; a child started from a short-lived worker thread would
  otherwise get SIGTERM the moment that worker finished (seen with a ThreadPoolExecutor).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from vserve.logging_utils import get_logger
from vserve.roles import child_command

logger = get_logger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_COMM_MAX = 15  # TASK_COMM_LEN (16) minus the NUL
PARENT_DIED_EXIT_CODE = 1

_watch_lock = threading.Lock()
_watching = False
_spawn_queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] | None = None
_on_parent_death: list[Callable[[], None]] = []


def on_parent_death(fn: Callable[[], None]) -> None:
    """Run ``fn`` (best effort, never raising) just before exiting because the parent died.

    API servers use it to remove the run dir: a SIGKILLed supervisor cannot clean up, and
    no file of a dead server may be left behind.
    """
    _on_parent_death.append(fn)


def _prctl(option: int, arg: int | bytes) -> bool:
    """Call prctl(2) through libc; False where that is not possible (not Linux, no libc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, arg, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def flush_and_exit(code: int) -> None:
    """Run the parent-death callbacks, flush the logs and exit at once with ``code``."""
    for fn in _on_parent_death:
        with contextlib.suppress(Exception):
            fn()
    # Best effort only: a wedged stream must not keep the orphan alive.
    with contextlib.suppress(Exception):
        for handler in logging.getLogger("vserve").handlers:
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def exit_when_parent_dies(poll_interval: float = 0.5, parent_pid: int | None = None,
                          use_pdeathsig: bool = True) -> None:
    """Make this process exit when its parent dies. Call early in every child; idempotent.

    ``parent_pid`` is the supervisor's pid if the caller knows it (e.g. from its command
    line); when given and already not our parent, we exit at once, which closes the race of
    a parent dying before this call. Otherwise the parent is the one seen now.

    ``use_pdeathsig=False`` relies on the ``getppid()`` poll alone: PR_SET_PDEATHSIG fires
    when the *thread* that spawned us exits, and a library user (``vserve.LLM``) may create
    the engine from a short-lived thread of a process that lives on.
    """
    global _watching
    expected = os.getppid() if parent_pid is None else parent_pid
    # Arm PDEATHSIG first, then check: a parent that died before prctl is caught by the check.
    if use_pdeathsig:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != expected:
        logger.error("parent process %d is already gone; exiting", expected)
        flush_and_exit(PARENT_DIED_EXIT_CODE)
    with _watch_lock:
        if _watching:
            return
        _watching = True

    def watch() -> None:
        while True:
            time.sleep(poll_interval)
            if os.getppid() != expected:
                logger.error("parent process %d died; exiting", expected)
                flush_and_exit(PARENT_DIED_EXIT_CODE)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def set_process_title(name: str) -> None:
    """Set the kernel's comm name (``ps -o comm``, ``top``), truncated to 15 bytes.

    Best effort: setproctitle is not a dependency, so the full command line is unchanged.
    """
    _prctl(_PR_SET_NAME, name.encode("utf-8", "replace")[:_COMM_MAX])


def spawn_child(
    module: str,
    args: Sequence[str],
    name: str,
    env: Mapping[str, str] | None = None,
    pass_fds: Iterable[int] = (),
) -> subprocess.Popen[bytes]:
    """Start ``module`` with ``args`` in a fresh interpreter (``roles.child_command``: like
    ``python -m``, without the working directory on sys.path), named ``name`` in logs.

    ``env`` adds variables on top of the inherited environment (it does not replace it).
    stdin is /dev/null (children never read the terminal); stdout and stderr are inherited
    so that their log lines reach the user. Only ``pass_fds`` are inherited beyond 0-2.
    """
    if threading.current_thread() is threading.main_thread():
        return _popen(module, args, name, env, tuple(pass_fds))
    fut: Future[subprocess.Popen[bytes]] = Future()
    fds = tuple(pass_fds)
    _spawner().put((lambda: _popen(module, args, name, env, fds), fut))
    return fut.result()


def _spawner() -> queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]]:
    """The queue of the one daemon thread that forks children for callers off the main thread.

    A daemon thread (not an executor, whose workers are joined at interpreter exit) so that
    the children's PDEATHSIG "parent thread" dies only with the process.
    """
    global _spawn_queue
    with _watch_lock:
        if _spawn_queue is None:
            jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()

            def serve() -> None:
                while True:
                    fn, fut = jobs.get()
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:  # handed to the caller, not lost
                        fut.set_exception(exc)

            threading.Thread(target=serve, name="vserve-spawner", daemon=True).start()
            _spawn_queue = jobs
        return _spawn_queue


def _popen(
    module: str,
    args: Sequence[str],
    name: str,
    env: Mapping[str, str] | None,
    pass_fds: tuple[int, ...],
) -> subprocess.Popen[bytes]:
    child_env: dict[str, str] | None = None
    if env:
        child_env = dict(os.environ)
        child_env.update(env)
    cmd = child_command(module, args)
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        env=child_env,
        pass_fds=pass_fds,
        close_fds=True,
        start_new_session=False,  # see the module docstring: share the terminal's group
    )
    logger.debug("started %s (pid %d): %s", name, proc.pid, " ".join(cmd))
    return proc


def terminate_children(procs: Iterable[subprocess.Popen[bytes]], timeout: float) -> list[int]:
    """SIGTERM every live child, wait up to ``timeout`` s in all, SIGKILL the rest, reap all.

    Returns the pids that had to be killed. Never raises.
    """
    live: list[subprocess.Popen[bytes]] = []
    for proc in procs:
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                live.append(proc)
        except Exception:  # noqa: BLE001 - never raise from a cleanup path
            pass
    deadline = time.monotonic() + max(0.0, timeout)
    killed: list[int] = []
    for proc in live:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            killed.append(proc.pid)
            with contextlib.suppress(Exception):
                proc.kill()
        except Exception:  # noqa: BLE001
            pass
    for proc in live:
        with contextlib.suppress(Exception):
            proc.wait(timeout=5.0)  # SIGKILL cannot be ignored; this only reaps
    if killed:
        logger.warning("killed %d child process(es) that ignored SIGTERM: %s", len(killed), killed)
    return killed


def freeze_startup_heap() -> None:
    """Collect, then move everything alive into the garbage collector's permanent
    generation. Call once a process has finished starting (modules, model, sockets).

    The objects made at startup live as long as the process; without this every full
    collection walks them all again (a 0.2 s pause was measured in an engine serving a
    batch of 256), and serving pays for it in latency spikes. Objects made later are
    collected as usual.
    """
    gc.collect()
    gc.freeze()
