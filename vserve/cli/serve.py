"""`vserve serve`: arguments → typed configs → the supervisor."""

from __future__ import annotations

import argparse
import re

from vserve import envs
from vserve.config import (
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    ServerConfig,
)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_size(text: str) -> int:
    """'4GiB', '512MiB', '1e9'… → bytes."""
    m = _SIZE.match(text)
    if not m or m.group(2) is not None and m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="demo",
                   help="local HF directory, hub id, or 'demo' (default)")
    m = p.add_argument_group("model")
    m.add_argument("--tokenizer", default=None)
    m.add_argument("--revision", default=None)
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    m.add_argument("--max-model-len", type=int, default=None)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--served-model-name", nargs="+", default=None)
    m.add_argument("--chat-template", default=None, help="a file or a literal Jinja template")
    c = p.add_argument_group("KV cache")
    c.add_argument("--block-size", type=int, default=16)
    c.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=True)
    c.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    c.add_argument("--kv-cache-memory", type=parse_size, default=1 << 30,
                   help="CPU: memory for the KV cache (default 1GiB)")
    c.add_argument("--num-kv-blocks", type=int, default=None)
    s = p.add_argument_group("scheduler")
    s.add_argument("--max-num-batched-tokens", type=int, default=2048)
    s.add_argument("--max-num-seqs", type=int, default=256)
    s.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                   default=True)
    s.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs")
    s.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch the next decode step before reading this one's tokens "
                        "(default: on with CUDA, off on CPU)")
    d = p.add_argument_group("device")
    d.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    d.add_argument("--enforce-eager", action="store_true")
    d.add_argument("--benchmark-skip-compute", action="store_true",
                   help="BENCHMARKING ONLY: engines skip the model's arithmetic and emit fake "
                        "tokens, so the front end is what gets measured")
    par = p.add_argument_group("parallelism")
    par.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    par.add_argument("--data-parallel-size-local", type=int, default=None)
    par.add_argument("--data-parallel-start-rank", type=int, default=0)
    par.add_argument("--data-parallel-address", default="127.0.0.1")
    par.add_argument("--data-parallel-rpc-port", type=int, default=13345)
    par.add_argument("--headless", action="store_true", help="run engines only")
    par.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    par.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    h = p.add_argument_group("HTTP")
    h.add_argument("--host", default=envs.default_host(),
                   help="address to bind (default: $VSERVE_HOST, else 127.0.0.1)")
    h.add_argument("--port", type=int, default=8000)
    h.add_argument("--uds", default=None, help="serve on a Unix-domain socket instead")
    h.add_argument("--api-server-count", "-asc", type=int, default=1)
    h.add_argument("--api-key", nargs="+", default=None)
    h.add_argument("--allowed-origins", nargs="*", default=[])
    h.add_argument("--allowed-methods", nargs="*", default=["*"])
    h.add_argument("--allowed-headers", nargs="*", default=["*"])
    h.add_argument("--allow-credentials", action="store_true")
    h.add_argument("--max-num-queued-reqs", type=int, default=None)
    h.add_argument("--shutdown-timeout", type=float, default=30.0)
    h.add_argument("--max-request-body-bytes", type=parse_size, default=8 << 20)
    h.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error", "critical"])
    h.add_argument("--log-stats-interval", type=float, default=10.0,
                   help="seconds between stats log lines; 0 turns them off")


def build_configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig, ParallelConfig]:
    if args.tensor_parallel_size != 1:
        raise ValueError(f"--tensor-parallel-size {args.tensor_parallel_size}: tensor "
                         "parallelism is not implemented yet; use --data-parallel-size")
    if args.pipeline_parallel_size != 1:
        raise ValueError(f"--pipeline-parallel-size {args.pipeline_parallel_size}: pipeline "
                         "parallelism is not implemented")
    keys = list(args.api_key or [])
    if envs.api_key():
        keys.append(envs.api_key())
    engine = EngineConfig(
        model=ModelConfig(model=args.model, tokenizer=args.tokenizer, revision=args.revision,
                          dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
                          served_model_name=tuple(args.served_model_name or ()),
                          chat_template=args.chat_template),
        cache=CacheConfig(block_size=args.block_size,
                          enable_prefix_caching=args.enable_prefix_caching,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          kv_cache_memory_bytes=args.kv_cache_memory,
                          num_kv_blocks=args.num_kv_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_num_seqs=args.max_num_seqs,
                                  enable_chunked_prefill=args.enable_chunked_prefill,
                                  policy=args.scheduling_policy,
                                  async_scheduling=args.async_scheduling),
        device=DeviceConfig(device=args.device, enforce_eager=args.enforce_eager,
                            benchmark_skip_compute=args.benchmark_skip_compute),
    )
    server = ServerConfig(
        host=args.host, port=args.port, uds=args.uds, api_server_count=args.api_server_count,
        api_keys=tuple(keys), allowed_origins=tuple(args.allowed_origins),
        allowed_methods=tuple(args.allowed_methods),
        allowed_headers=tuple(args.allowed_headers), allow_credentials=args.allow_credentials,
        max_num_queued_reqs=args.max_num_queued_reqs, shutdown_timeout=args.shutdown_timeout,
        max_request_body_bytes=args.max_request_body_bytes, log_level=args.log_level,
        log_stats_interval=args.log_stats_interval,
    )
    parallel = ParallelConfig(
        data_parallel_size=args.data_parallel_size,
        data_parallel_size_local=args.data_parallel_size_local,
        data_parallel_start_rank=args.data_parallel_start_rank,
        data_parallel_address=args.data_parallel_address,
        data_parallel_rpc_port=args.data_parallel_rpc_port, headless=args.headless,
    )
    return engine, server, parallel


def run_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vserve.launch.supervisor import Supervisor
    from vserve.logging_utils import get_logger
    from vserve.models.arch import load_arch_config
    from vserve.models.loader import resolve_model_dir
    from vserve.tokenizer import Tokenizer

    logger = get_logger("vserve.cli")
    try:
        engine, server, parallel = build_configs(args)
        model_dir: Path = resolve_model_dir(engine.model.model, engine.model.revision)
        # Fail fast, in the supervisor, on what can be checked without loading weights.
        load_arch_config(model_dir)
        if not parallel.headless:
            tok_dir = engine.model.tokenizer or model_dir
            try:
                Tokenizer.from_pretrained(tok_dir, chat_template=engine.model.chat_template)
            except Exception as e:  # noqa: BLE001 - transformers raises many kinds
                raise ValueError(f"cannot load the tokenizer from {tok_dir}: {e}") from e
    except (ValueError, FileNotFoundError, OSError) as e:
        logger.error("%s", e)
        return 2
    return Supervisor(engine, server, parallel, model_dir).run()
