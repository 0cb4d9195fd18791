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
