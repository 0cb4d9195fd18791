"""Typed configuration, built once (from the CLI or ``LLM(**kwargs)``) and passed down.

Everything here is a frozen dataclass so that it can be shared between threads, hashed, and
sent to an engine process as msgpack (msgspec encodes and decodes dataclasses).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    """What to load. ``model`` is a local HF directory, a hub id, or ``demo``."""

    model: str = "demo"
    tokenizer: str | None = None  # defaults to the model's directory
    revision: str | None = None
    dtype: str = "auto"  # auto: the checkpoint's torch_dtype
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    seed: int = 0
    served_model_name: tuple[str, ...] = ()
    chat_template: str | None = None  # a path or a literal Jinja template

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    # CPU: memory for the KV cache (the analogue of vLLM's VLLM_CPU_KVCACHE_SPACE).
    kv_cache_memory_bytes: int = 1 << 30
    num_kv_blocks: int | None = None  # overrides sizing from memory (tests use it)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # token budget of one step
    max_num_seqs: int = 256  # sequences in one step
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # or "priority"
    # Launch the next decode step before reading this one's tokens (the GPU never waits for
    # the host). None: on when the engine runs on CUDA.
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be positive")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be positive")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "auto"  # auto: cuda when available, else cpu
    enforce_eager: bool = False  # no CUDA graphs
    # Benchmarking tool only, never a default: engines skip the model's arithmetic and emit
    # tokens as fast as the scheduler runs, so that the front end is the bottleneck.
    benchmark_skip_compute: bool = False

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")


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


@dataclass(frozen=True)
class ParallelConfig:
    data_parallel_size: int = 1
    data_parallel_size_local: int | None = None  # engines on this node (default: all)
    data_parallel_start_rank: int = 0  # first rank on this node
    data_parallel_address: str = "127.0.0.1"  # the head node, for --headless engines
    data_parallel_rpc_port: int = 13345  # the head node's handshake port (multi-node only)
    headless: bool = False  # engines only, joining a head node

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

    host: str = "127.0.0.1"
    port: int = 8000
    uds: str | None = None
    api_server_count: int = 1
    api_keys: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    max_num_queued_reqs: int | None = None  # whole-server bound on waiting requests
    shutdown_timeout: float = 30.0
    max_request_body_bytes: int = 8 << 20
    log_level: str = "info"
    log_stats_interval: float = 10.0  # 0 turns the periodic stats line off
    uvicorn_log_level: str = "warning"

    def __post_init__(self) -> None:
        if self.api_server_count < 1:
            raise ValueError("api_server_count must be at least 1")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must be non-negative")
        if self.max_num_queued_reqs is not None and self.max_num_queued_reqs < 0:
            raise ValueError("max_num_queued_reqs must be non-negative")
