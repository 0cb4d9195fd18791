"""The supervisor's handshake and control link, and the API server's start-up arguments.

The supervisor binds one ROUTER; every engine and every API server connects a DEALER.

- engine → supervisor: ``EngineHello`` (process up), then ``EngineReady`` or
  ``EngineStartupError``;
- API server → supervisor: ``ApiServerHello`` (links bound, real endpoints), later
  ``ApiServerDrained``;
- supervisor → engine (:data:`ToEngine`): ``EngineStartupInfo`` in answer to HELLO, then
  ``ClientDied`` / ``ShutdownEngine``;
- supervisor → API server (:data:`ToApiServer`): ``ApiServerGo``, ``DrainServer``,
  ``ExitServer``, ``StopServer``, ``EngineDied``.

Everything arriving at the supervisor is one union, :data:`ToSupervisor`.
"""

from __future__ import annotations

import msgspec

# ---- engine → supervisor ---------------------------------------------------------------


class EngineHello(msgspec.Struct, tag="engine_hello", array_like=True, gc=False):
    """The engine process is up (before loading the model)."""

    engine_index: int
    pid: int


class EngineReady(msgspec.Struct, tag="engine_ready", array_like=True, gc=False):
    """The model is loaded and the KV cache is allocated."""

    engine_index: int
    num_kv_blocks: int
    block_size: int
    max_model_len: int
    max_concurrency: float


class EngineStartupError(msgspec.Struct, tag="engine_error", array_like=True, gc=False):
    engine_index: int
    error: str  # the exception's type, message and traceback


# ---- API server → supervisor -----------------------------------------------------------


class ApiServerHello(msgspec.Struct, tag="api_hello", array_like=True, gc=False):
    """My links are bound at these (real) endpoints."""

    client_index: int
    pid: int
    input_addr: str
    output_addr: str


class ApiServerDrained(msgspec.Struct, tag="api_drained", array_like=True, gc=False):
    """Nothing of mine is in flight any more (draining)."""

    client_index: int


ToSupervisor = EngineHello | EngineReady | EngineStartupError | ApiServerHello | ApiServerDrained

# ---- supervisor → engine ---------------------------------------------------------------


class EngineStartupInfo(msgspec.Struct, tag="startup", array_like=True, gc=False):
    """In answer to HELLO: what to load and where the front ends are.

    ``input_addrs[i]`` / ``output_addrs[i]`` belong to the front end with client_index i.
    """

    config: bytes  # vserve.config.EngineConfig as msgpack (this package imports no config)
    model_dir: str
    input_addrs: list[str]
    output_addrs: list[str]
    stats_addr: str | None = None


class ClientDied(msgspec.Struct, tag="client_died", array_like=True, gc=False):
    """Front end ``client_index`` died: drop its requests and announce yourself again on
    its request link (its replacement binds the same endpoint)."""

    client_index: int


class ShutdownEngine(msgspec.Struct, tag="shutdown", array_like=True, gc=False):
    """Stop after the current step."""


ToEngine = EngineStartupInfo | ClientDied | ShutdownEngine

# ---- supervisor → API server -----------------------------------------------------------


class ApiServerGo(msgspec.Struct, tag="go", array_like=True, gc=False):
    """Every engine is ready; take the listening socket and serve."""

    max_model_len: int
    num_kv_blocks: list[int]


class DrainServer(msgspec.Struct, tag="drain", array_like=True, gc=False):
    """Refuse new requests, finish the ones in flight, then report ``ApiServerDrained``."""


class ExitServer(msgspec.Struct, tag="exit", array_like=True, gc=False):
    """Every server has drained: close the socket and exit."""


class StopServer(msgspec.Struct, tag="stop", array_like=True, gc=False):
    """The server is going down without a drain: end every request in flight with
    ``reason`` (streams get an error event and ``[DONE]``), then exit."""

    reason: str


class EngineDied(msgspec.Struct, tag="engine_died", array_like=True, gc=False):
    """Engine ``engine_index`` exited: fail its requests."""

    engine_index: int
    reason: str


ToApiServer = ApiServerGo | DrainServer | ExitServer | StopServer | EngineDied

# ---- the API server's arguments (a file the supervisor writes once) ---------------------


class ApiServerArgs(msgspec.Struct, gc=False):
    """Everything an API server process needs besides its index."""

    config: bytes  # vserve.config.ServeConfig as msgpack
    model_dir: str
    handshake_addr: str
    fd_socket_path: str
    connections_path: str  # the ConnectionTable every API server shares
    input_addrs: list[str]  # per client index: where to bind (replacements reuse them)
    output_addrs: list[str]
    snapshot_addr: str | None
    supervisor_pid: int
