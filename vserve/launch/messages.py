"""Messages on the supervisor's handshake/control link (ROUTER in the supervisor).

Engines and API servers each hold one DEALER to it. Everything is a tagged msgspec Struct,
so one decoder tells the kinds apart; nothing is pickled.
"""

from __future__ import annotations

import msgspec

from vserve.config import EngineConfig, ParallelConfig, ServerConfig
from vserve.engine.messages import EngineHello, EngineReady, EngineStartupError


class ApiServerHello(msgspec.Struct, array_like=True, gc=False, tag=True):
    """API server → supervisor: my links are bound at these (real) endpoints."""

    client_index: int
    pid: int
    input_addr: str
    output_addr: str


class ApiServerDrained(msgspec.Struct, array_like=True, gc=False, tag=True):
    """API server → supervisor: nothing of mine is in flight any more (draining)."""

    client_index: int


class ApiServerGo(msgspec.Struct, array_like=True, gc=False, tag=True):
    """Supervisor → API server: every engine is ready; take the socket and serve."""

    max_model_len: int
    num_kv_blocks: list[int]


class ApiServerControl(msgspec.Struct, array_like=True, gc=False, tag=True):
    """Supervisor → API server. kinds: ``drain``, ``exit`` (after every server drained),
    ``engine_died``."""

    kind: str
    engine_index: int = -1
    reason: str = ""


class ApiServerArgs(msgspec.Struct, gc=False):
    """Everything an API server process needs, written once by the supervisor to a file."""

    engine: EngineConfig
    server: ServerConfig
    parallel: ParallelConfig
    model_dir: str
    handshake_addr: str
    fd_socket_path: str
    input_addrs: list[str]  # per client index: where to bind (replacements reuse them)
    output_addrs: list[str]
    snapshot_addr: str | None
    supervisor_pid: int


ToSupervisor = EngineHello | EngineReady | EngineStartupError | ApiServerHello | ApiServerDrained
ToApiServer = ApiServerGo | ApiServerControl
