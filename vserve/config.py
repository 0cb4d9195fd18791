"""Typed configuration: the one place where every option is declared.

Each field of the frozen dataclasses below is an option. Its name (``--max-num-seqs`` on the
command line, ``max_num_seqs=`` for ``LLM``), type, default, help text and choices live here
and nowhere else; validation lives in ``__post_init__``. ``vserve.cli.args`` derives the
``vserve serve`` parser from these fields and :meth:`EngineConfig.from_options` is what
``LLM(**kwargs)`` calls, so adding an option is one edit here.

Configs are built once (CLI or kwargs), passed down, shared between threads and sent to
child processes as msgpack (msgspec encodes and decodes dataclasses); nothing below reads
the environment except through ``vserve.envs``.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import msgspec

from vserve import envs

T = TypeVar("T")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_size(text: str) -> int:
    """'4GiB', '512MiB', '1e9', '1000' → bytes (ValueError naming the text otherwise)."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "").lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 4GiB, 512MiB, 1e9)")
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: int) -> str:
    """Bytes as the largest binary unit that divides them: 1073741824 → '1GiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def option(default: Any = dataclasses.MISSING, *, help: str,
           default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
           flags: tuple[str, ...] = (), parse: Callable[[str], Any] | None = None,
           nargs: str | None = None, metavar: str | None = None,
           positional: bool = False) -> Any:
    """Declare one option: a dataclass field carrying what the CLI needs to offer it.

    ``flags`` replaces the derived ``--field-name`` (the first is the main one; more are
    aliases); ``parse`` turns the command-line text into the value (default: the field's
    type); ``nargs`` for list options; ``positional`` for the model argument.
    """
    metadata = {"help": help, "flags": flags, "parse": parse, "nargs": nargs,
                "metavar": metavar, "positional": positional}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


Dtype = Literal["auto", "float32", "float16", "bfloat16"]
Quantization = Literal["fp8"]
KVCacheDtype = Literal["auto", "fp8", "fp8_e4m3"]
Device = Literal["auto", "cpu", "cuda"]
SchedulingPolicy = Literal["fcfs", "priority"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
ToolCallParser = Literal["hermes", "llama3_json", "mistral"]


@dataclass(frozen=True)
class ModelConfig:
    """What to load."""

    model: str = option("demo", positional=True,
                        help="a local Hugging Face model directory, a hub id, or 'demo' (the "
                             "built-in tiny random-weight model)")
    tokenizer: str | None = option(None, help="tokenizer directory or hub id (default: the "
                                              "model's)")
    revision: str | None = option(None, help="hub revision (branch, tag or commit) of the model")
    dtype: Dtype = option("auto", help="weights and activations; auto is the checkpoint's "
                                       "torch_dtype")
    quantization: Quantization | None = option(
        None, flags=("--quantization", "-q"),
        help="fp8: float8 e4m3 linear weights with per-output-channel scales, quantized "
             "as a 16-bit checkpoint loads (FP8 checkpoints are run as FP8 without it)")
    max_model_len: int | None = option(None, help="context window (prompt + output tokens); "
                                                  "default: the model's maximum")
    seed: int = option(0, help="seed of the sampler for requests without a seed of their own")
    generation_config: str = option(
        "auto", help="sampling defaults for fields a request leaves unset (temperature, "
                     "top_p, top_k, min_p, repetition_penalty, max_new_tokens as max_tokens): "
                     "'auto' from the model's generation_config.json, 'vserve' vserve's own, "
                     "or a directory holding a generation_config.json")
    served_model_name: tuple[str, ...] = option(
        (), nargs="+", help="names clients use in the 'model' field; the first is reported "
                            "in responses (default: the model argument)")
    chat_template: str | None = option(None, help="a Jinja chat template, or a file holding "
                                                  "one (default: the tokenizer's)")

    def __post_init__(self) -> None:
        _check_choice(self, "dtype")
        if self.quantization is not None:
            _check_choice(self, "quantization")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")

    @property
    def served_name(self) -> str:
        """The name reported in responses and metrics."""
        return self.served_model_name[0] if self.served_model_name else self.model


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = option(16, help="tokens per KV-cache block (a power of two)")
    enable_prefix_caching: bool = option(True, help="reuse the KV cache of shared prompt "
                                                    "prefixes")
    gpu_memory_utilization: float = option(
        0.9, help="CUDA: fraction of the GPU's memory for weights, activations and KV cache")
    kv_cache_memory_bytes: int = option(
        1 << 30, flags=("--kv-cache-memory-bytes", "--kv-cache-memory"), parse=parse_size,
        metavar="SIZE", help="CPU: memory for the KV cache, e.g. 4GiB")
    num_kv_blocks: int | None = option(None, help="KV-cache blocks, overriding the sizing "
                                                  "from memory")
    kv_cache_dtype: KVCacheDtype = option(
        "auto", help="auto: the model's dtype; fp8 (= fp8_e4m3): keys and values stored as "
                     "float8 e4m3 (divided by an FP8 checkpoint's per-layer KV scales, else "
                     "unscaled; clamped to +-448), half the bytes of 16-bit: twice the tokens "
                     "in the same memory and half the cache reads of a decode step, at a "
                     "small loss of precision")

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_memory_bytes < 1:
            raise ValueError("kv_cache_memory_bytes must be positive")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        _check_choice(self, "kv_cache_dtype")

    @property
    def kv_cache_fp8(self) -> bool:
        return self.kv_cache_dtype in ("fp8", "fp8_e4m3")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = option(2048, help="token budget of one engine step")
    max_num_seqs: int = option(256, help="sequences in one engine step")
    enable_chunked_prefill: bool = option(True, help="split long prompts over several steps")
    scheduling_policy: SchedulingPolicy = option(
        "fcfs", help="fcfs, or priority (requests' 'priority' field; lower runs first)")
    async_scheduling: bool | None = option(
        None, help="launch the next decode step before reading this one's tokens "
                   "(default: on with CUDA, off on CPU)")

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be positive")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be positive")
        _check_choice(self, "scheduling_policy")


@dataclass(frozen=True)
class DeviceConfig:
    device: Device = option("auto", help="auto: cuda when available, else cpu")
    enforce_eager: bool = option(False, help="CUDA: no CUDA graphs")
    cpu_threads: int | None = option(
        None, help="torch CPU threads of each engine (default: $OMP_NUM_THREADS when set, "
                   "else the CPUs this node lets the server use — affinity and cgroup quota "
                   "— less one for the front end, divided among its engines)")
    tensor_parallel_size: int = option(
        1, flags=("--tensor-parallel-size", "-tp"),
        help="processes each engine's model is split over (heads, MLP and vocabulary "
             "sharded, torch.distributed between them); CPU (gloo) only so far")
    mixed_step_graphs: bool = option(
        True, help="CUDA: also replay CUDA graphs for steps holding prompt chunks (up to "
                   "2048 tokens), not only for pure decode steps")
    benchmark_skip_compute: bool = option(
        False, help="BENCHMARKING ONLY: engines skip the model's arithmetic and emit fake "
                    "tokens (under a grammar: tokens its mask allows), so that the front end "
                    "and the engine's host work are what gets measured")
    benchmark_step_ms: float = option(
        0.0, help="BENCHMARKING ONLY, with --benchmark-skip-compute: each fake step holds a "
                  "simulated device for this many milliseconds (a GPU's step time), its "
                  "tokens ready only then, so that what the host fails to overlap with the "
                  "device shows")

    def __post_init__(self) -> None:
        _check_choice(self, "device")
        if self.benchmark_step_ms < 0:
            raise ValueError("benchmark_step_ms must not be negative")
        if self.benchmark_step_ms and not self.benchmark_skip_compute:
            raise ValueError("benchmark_step_ms needs benchmark_skip_compute")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError("cpu_threads must be at least 1")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be at least 1")


@dataclass(frozen=True)
class EngineConfig:
    """All an engine core needs; sent to the engine process as msgpack."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)

    def to_msgpack(self) -> bytes:
        return msgspec.msgpack.encode(self)

    @staticmethod
    def from_msgpack(data: bytes) -> EngineConfig:
        return msgspec.msgpack.decode(data, type=EngineConfig)

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        """Build from flat option names (``LLM(**kwargs)``); a TypeError names unknown ones."""
        return build_config(cls, options)


@dataclass(frozen=True)
class ParallelConfig:
    data_parallel_size: int = option(1, flags=("--data-parallel-size", "-dp"),
                                     help="engine replicas in the whole server")
    data_parallel_size_local: int | None = option(
        None, help="engines on this node (default: all from --data-parallel-start-rank on)")
    data_parallel_start_rank: int = option(0, help="rank of this node's first engine")
    data_parallel_address: str = option(
        "127.0.0.1", help="multi-node: the head node's address, where headless engines join")
    data_parallel_rpc_port: int = option(
        13345, help="multi-node: the head node's handshake port")
    headless: bool = option(False, help="run engines only, joining the head node at "
                                        "--data-parallel-address:--data-parallel-rpc-port")
    cluster_key_file: str | None = option(
        None, help="multi-node (required): a file holding the secret that authenticates and "
                   "encrypts (ZMQ CURVE) every link between nodes; the head creates it if it "
                   "does not exist, headless nodes need a copy (e.g. a Kubernetes Secret)")

    def __post_init__(self) -> None:
        if self.data_parallel_size < 1:
            raise ValueError("data_parallel_size must be at least 1")
        local = self.local_size
        if local < 0 or self.data_parallel_start_rank + local > self.data_parallel_size:
            raise ValueError(
                f"data_parallel_start_rank ({self.data_parallel_start_rank}) + "
                f"data_parallel_size_local ({local}) exceeds data_parallel_size "
                f"({self.data_parallel_size})"
            )
        if self.headless and local == 0:
            raise ValueError("--headless needs at least one local engine")
        if self.multi_node and not self.cluster_key_file:
            raise ValueError("multi-node mode (--headless, or --data-parallel-size-local below "
                             "--data-parallel-size) needs --cluster-key-file: its links "
                             "listen on TCP and must be authenticated")

    @property
    def local_size(self) -> int:
        if self.data_parallel_size_local is None:
            return self.data_parallel_size - self.data_parallel_start_rank
        return self.data_parallel_size_local

    @property
    def local_ranks(self) -> list[int]:
        start = self.data_parallel_start_rank
        return list(range(start, start + self.local_size))

    @property
    def multi_node(self) -> bool:
        return self.headless or self.local_size < self.data_parallel_size


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP side of ``vserve serve``."""

    host: str = option(default_factory=envs.default_host,
                       help="address to bind (default: $VSERVE_HOST, else 127.0.0.1)")
    port: int = option(8000, help="TCP port to bind")
    uds: str | None = option(None, help="serve on this Unix-domain socket instead of TCP")
    api_server_count: int = option(1, flags=("--api-server-count", "-asc"),
                                   help="API-server processes sharing the listening socket")
    api_keys: tuple[str, ...] = option(
        (), flags=("--api-key",), nargs="+",
        help="bearer tokens clients must send (visible in the process list: prefer "
             "--api-key-file or $VSERVE_API_KEY, which are accepted as well)")
    api_key_file: str | None = option(
        None, help="a file of bearer tokens clients may send, one per line")
    allowed_origins: tuple[str, ...] = option((), nargs="*", help="CORS allowed origins")
    allowed_methods: tuple[str, ...] = option(("*",), nargs="*", help="CORS allowed methods")
    allowed_headers: tuple[str, ...] = option(("*",), nargs="*", help="CORS allowed headers")
    allow_credentials: bool = option(False, help="CORS: allow credentials")
    max_num_queued_reqs: int | None = option(
        None, help="whole-server bound on waiting requests; above it new requests get 503 + "
                   "Retry-After")
    shutdown_timeout: float = option(
        30.0, help="seconds in-flight requests may take to finish after SIGTERM")
    max_request_body_bytes: int = option(8 << 20, parse=parse_size, metavar="SIZE",
                                         help="largest request body accepted (413 above)")
    max_header_bytes: int = option(64 << 10, parse=parse_size, metavar="SIZE",
                                   help="largest request line plus headers accepted (431 "
                                        "above)")
    max_header_count: int = option(100, help="most header fields in a request (431 above)")
    http_header_timeout: float = option(
        10.0, help="seconds a client may take to send a request's headers, counted from the "
                   "connection (or the request's first byte); then 408 and the connection "
                   "closes")
    http_body_timeout: float = option(
        30.0, help="seconds a request body may stall between two reads; then 408 and the "
                   "connection closes")
    max_connections: int | None = option(
        None, help="open connections per API server (default: its file-descriptor limit "
                   "minus 128); beyond it the oldest idle connection is closed, or new ones "
                   "wait in the listen backlog")
    max_engine_restarts: int = option(
        5, help="engines replaced in place within 10 minutes before the server gives up and "
                "exits non-zero; 0 exits at the first engine death")
    engine_heartbeat_timeout: float = option(
        30.0, help="seconds an engine may go without reporting from its busy loop before it "
                   "is treated as dead (killed and replaced; a remote one is routed around); "
                   "must exceed the longest engine step")
    api_server_heartbeat_timeout: float = option(
        30.0, help="seconds an API server's event loop may go without a heartbeat before "
                   "the supervisor kills and replaces it")
    enable_auto_tool_choice: bool = option(
        False, help="serve tool_choice 'auto' (and tools without a tool_choice): the model's "
                    "own tool-call format, read by --tool-call-parser")
    tool_call_parser: ToolCallParser | None = option(
        None, help="how to read tool calls out of the model's output with "
                   "--enable-auto-tool-choice: hermes (<tool_call> JSON: Qwen2/Qwen3, the "
                   "demo model), llama3_json, mistral")
    log_level: LogLevel = option("info", help="vserve's log level")
    log_stats_interval: float = option(10.0, help="seconds between stats log lines; 0 turns "
                                                  "them off")
    uvicorn_log_level: LogLevel = option("warning", help="uvicorn's own log level")

    def __post_init__(self) -> None:
        if self.api_server_count < 1:
            raise ValueError("api_server_count must be at least 1")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must be non-negative")
        if self.max_num_queued_reqs is not None and self.max_num_queued_reqs < 0:
            raise ValueError("max_num_queued_reqs must be non-negative")
        if self.max_header_bytes < 1024 or self.max_header_count < 1:
            raise ValueError("max_header_bytes must be at least 1KiB and max_header_count "
                             "positive")
        if self.http_header_timeout <= 0 or self.http_body_timeout <= 0:
            raise ValueError("http_header_timeout and http_body_timeout must be positive")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("max_connections must be positive")
        if self.max_engine_restarts < 0:
            raise ValueError("max_engine_restarts must be non-negative")
        if self.api_server_heartbeat_timeout <= 1.0:
            raise ValueError("api_server_heartbeat_timeout must be more than a second")
        if self.engine_heartbeat_timeout <= 1.0:
            raise ValueError("engine_heartbeat_timeout must be more than a second (engines "
                             "report once a second)")
        if any(not key.strip() for key in self.api_keys):
            raise ValueError("an API key must not be empty (it would let any client in with "
                             "an empty bearer token)")
        _check_choice(self, "log_level")
        _check_choice(self, "uvicorn_log_level")
        if self.tool_call_parser is not None:
            _check_choice(self, "tool_call_parser")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (hermes, "
                             "llama3_json or mistral)")


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``vserve serve`` was told; the supervisor passes it down whole."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_msgpack(self) -> bytes:
        return msgspec.msgpack.encode(self)

    @staticmethod
    def from_msgpack(data: bytes) -> ServeConfig:
        return msgspec.msgpack.decode(data, type=ServeConfig)

    @classmethod
    def from_options(cls, **options: Any) -> ServeConfig:
        return build_config(cls, options)


# ---- deriving from the declarations --------------------------------------------------------


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of ``cls`` (cached: ``__post_init__`` asks on every build)."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def option_fields(cls: type) -> Iterator[tuple[type, dataclasses.Field[Any], Any]]:
    """Every option of ``cls`` and its nested sections, in declaration order:
    ``(section class, field, resolved type)``."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp = hints[f.name]
        if _is_section(tp):
            yield from option_fields(tp)
        else:
            yield cls, f, tp


def build_config(cls: type[T], options: Mapping[str, Any]) -> T:
    """``cls`` (a config or a config of sections) from flat option names; sections are
    filled from the names they declare. Unknown names raise a TypeError naming them."""
    left = dict(options)
    config = _build(cls, left)
    if left:
        known = sorted(f.name for _, f, _ in option_fields(cls))
        raise TypeError(f"unknown option(s) {', '.join(sorted(left))}; the options are "
                        f"{', '.join(known)}")
    return config


def _build(cls: type[T], left: dict[str, Any]) -> T:
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp = hints[f.name]
        if _is_section(tp):
            kwargs[f.name] = _build(tp, left)
        elif f.name in left:
            value = left.pop(f.name)
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def choices_of(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a ``Literal`` option type (None for other types)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is Literal:
        return tuple(typing.get_args(tp))
    if len(args) == 1 and typing.get_origin(args[0]) is Literal:
        return tuple(typing.get_args(args[0]))
    return None


def _check_choice(config: object, name: str) -> None:
    tp = _hints(type(config))[name]
    allowed = choices_of(tp)
    value = getattr(config, name)
    if allowed is not None and value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
