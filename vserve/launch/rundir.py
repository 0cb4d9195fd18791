"""The private run directory of one ``vserve serve``: IPC socket paths and Prometheus files.

Layout::

    /tmp/vserve-XXXXXXXX/        mode 0700, owned by the supervisor's user
        ipc/                     ZMQ ipc:// sockets and the listen-socket hand-off socket
        prometheus/              PROMETHEUS_MULTIPROC_DIR

Invariants: the directory is created with mkdtemp (unique, 0700, no race with another user);
the supervisor removes it on every exit path with :func:`remove_run_dir`, which never raises.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

IPC_SUBDIR = "ipc"
PROMETHEUS_SUBDIR = "prometheus"
# sockaddr_un.sun_path is 108 bytes on Linux including the terminating NUL; libzmq refuses
# longer ipc paths (ENAMETOOLONG) with a message that does not say which path.
MAX_IPC_PATH_BYTES = 107


def make_run_dir(prefix: str = "vserve-", base_dir: str | None = None) -> Path:
    """Create the run dir (mode 0700) with its ``ipc/`` and ``prometheus/`` subdirs.

    ``base_dir`` defaults to the system temp dir; keep it short, ipc paths are limited to
    :data:`MAX_IPC_PATH_BYTES`.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base_dir))
    try:
        os.chmod(path, 0o700)  # mkdtemp already does; be explicit, it is the security boundary
        (path / IPC_SUBDIR).mkdir(mode=0o700)
        (path / PROMETHEUS_SUBDIR).mkdir(mode=0o700)
    except BaseException:
        remove_run_dir(path)
        raise
    return path


def remove_run_dir(path: str | os.PathLike[str] | None) -> None:
    """Remove the run dir and everything in it. Never raises (used on every exit path)."""
    if path is None:
        return
    try:
        shutil.rmtree(path, ignore_errors=True)
    except Exception:  # noqa: BLE001 - a cleanup path must not mask the real error
        pass


def ipc_path(run_dir: str | os.PathLike[str], name: str) -> str:
    """``RUN_DIR/ipc/NAME`` for any Unix socket; ValueError when too long for sun_path."""
    if not name or "/" in name or "\0" in name:
        raise ValueError(f"invalid ipc endpoint name {name!r}")
    path = os.path.join(os.fspath(run_dir), IPC_SUBDIR, name)
    size = len(os.fsencode(path))
    if size > MAX_IPC_PATH_BYTES:
        raise ValueError(
            f"ipc path {path!r} is {size} bytes, over the {MAX_IPC_PATH_BYTES}-byte limit of "
            "Unix socket paths; use a shorter temp dir or a shorter name"
        )
    return path


def ipc_endpoint(run_dir: str | os.PathLike[str], name: str) -> str:
    """``ipc://RUN_DIR/ipc/NAME`` for ZMQ; ValueError when the path is too long."""
    return f"ipc://{ipc_path(run_dir, name)}"
