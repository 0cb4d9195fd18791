"""The supervisor's handshake and control link, and the API server's start-up arguments.

The supervisor binds one ROUTER; every engine and every API server connects a DEALER.

- engine → supervisor: ``EngineHello`` (process up), then ``EngineReady`` or
  ``EngineStartupError``;
- API server → supervisor: ``ApiServerHello`` (links bound, real endpoints), later
  ``ApiServerDrained``;
- a headless node's supervisor → the head's: ``RemoteEngineExited``;
- supervisor → engine (:data:`ToEngine`): ``EngineStartupInfo`` in answer to HELLO, then
  ``ClientDied`` / ``ShutdownEngine``, and ``HeadHeartbeat`` every second;
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


# ---- headless node's supervisor → head ---------------------------------------------------


class RemoteEngineExited(msgspec.Struct, tag="remote_exited", array_like=True, gc=False):
    """A headless node's engine ``engine_index`` exited (``reason`` says how); the node
    starts a replacement when ``replacing``. The head routes around the rank at once rather
    than after its heartbeat timeout."""

    engine_index: int
    reason: str
    cause: str  # exited / killed: counted by the replacement in vserve_engine_restarts
    replacing: bool
    pid: int


ToSupervisor = (EngineHello | EngineReady | EngineStartupError | ApiServerHello
                | ApiServerDrained | RemoteEngineExited)

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
    # Seconds without a HeadHeartbeat after which the engine concludes the head is gone and
    # exits (0: do not watch; engines on the head's machine follow their parent instead).
    head_timeout: float = 0.0
    # Non-empty for a replacement: why its predecessor went (exited, killed, hung); the
    # replacement counts it in vserve_engine_restarts_total.
    restarted_because: str = ""


class ClientDied(msgspec.Struct, tag="client_died", array_like=True, gc=False):
    """Front end ``client_index`` died: drop its requests and announce yourself again on
    its request link (its replacement binds the same endpoint)."""

    client_index: int


# The exit code of an engine told ``ShutdownEngine(replace=True)``: its node starts another.
ENGINE_EXIT_REPLACE = 75


class ShutdownEngine(msgspec.Struct, tag="shutdown", array_like=True, gc=False):
    """Stop after the current step. With ``replace`` the head gave up on this (remote)
    engine, which went silent: it exits with :data:`ENGINE_EXIT_REPLACE` and its node starts
    a fresh one, which joins again."""

    replace: bool = False


class HeadHeartbeat(msgspec.Struct, tag="heartbeat", array_like=True, gc=False):
    """The head is alive (sent every second to every engine)."""


ToEngine = EngineStartupInfo | ClientDied | ShutdownEngine | HeadHeartbeat

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
    """Engine ``engine_index`` is gone: fail its requests and route around it. With
    ``replacing`` a new engine for that rank is on its way (it announces itself when ready);
    without, the rank is gone for good."""

    engine_index: int
    reason: str
    replacing: bool = False
    # The dead process; an API server that already sees a newer one for the rank (the
    # replacement announced itself first) ignores the message.
    pid: int = 0


ToApiServer = ApiServerGo | DrainServer | ExitServer | StopServer | EngineDied

# ---- the API server's arguments (a file the supervisor writes once) ---------------------


class ApiServerArgs(msgspec.Struct, gc=False):
    """Everything an API server process needs besides its index."""

    config: bytes  # vserve.config.ServeConfig as msgpack
    model_dir: str
    handshake_addr: str
    fd_socket_path: str
    connections_path: str  # the ConnectionTable every API server shares
    admission_path: str  # the AdmissionLedger every API server shares
    input_addrs: list[str]  # per client index: where to bind (replacements reuse them)
    output_addrs: list[str]
    snapshot_addr: str | None
    supervisor_pid: int
