"""Options are declared once (vserve/config.py): the `vserve serve` parser and `LLM(**kwargs)`
are derived from the declarations, so they cannot drift apart."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from vserve.cli.serve import add_serve_args, build_config
from vserve.config import (
    EngineConfig,
    ServeConfig,
    format_size,
    option_fields,
    parse_size,
)


def parse(*argv: str) -> ServeConfig:
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    return build_config(parser.parse_args(list(argv)))


def test_defaults_match_the_declarations() -> None:
    assert parse("demo") == ServeConfig()


def test_every_option_has_help_and_a_flag() -> None:
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    help_text = " ".join(parser.format_help().split())  # unwrapped
    for _, f, _ in option_fields(ServeConfig):
        assert f.metadata.get("help"), f"{f.name} has no help text"
        if not f.metadata.get("positional"):
            flag = (f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),))[0]
            assert flag in help_text, flag
    assert "(default: 256)" in help_text  # max_num_seqs
    assert "(default: 1GiB)" in help_text  # kv_cache_memory_bytes, shown as a size
    assert "--tensor-parallel-size" in help_text and "-tp" in help_text
    assert "--pipeline-parallel-size" not in help_text  # not offered until it exists


def test_flags_reach_the_typed_config() -> None:
    cfg = parse("some/model", "--max-num-seqs", "7", "--kv-cache-memory", "2GiB",
                "--no-enable-prefix-caching", "--scheduling-policy", "priority",
                "--served-model-name", "a", "b", "--api-key", "k1", "-dp", "2",
                "--async-scheduling", "--dtype", "bfloat16", "--max-request-body-bytes",
                "1MiB", "-tp", "2")
    assert cfg.engine.model.model == "some/model"
    assert cfg.engine.device.tensor_parallel_size == 2
    assert cfg.engine.model.served_model_name == ("a", "b")
    assert cfg.engine.model.served_name == "a"
    assert cfg.engine.model.dtype == "bfloat16"
    assert cfg.engine.scheduler.max_num_seqs == 7
    assert cfg.engine.scheduler.scheduling_policy == "priority"
    assert cfg.engine.scheduler.async_scheduling is True
    assert cfg.engine.cache.kv_cache_memory_bytes == 2 << 30
    assert cfg.engine.cache.enable_prefix_caching is False
    assert cfg.server.api_keys == ("k1",)
    assert cfg.server.max_request_body_bytes == 1 << 20
    assert cfg.parallel.data_parallel_size == 2


@pytest.mark.parametrize("argv, message", [
    (["demo", "--dtype", "float64"], "invalid choice"),
    # The model is required: an option taking several values cannot swallow it silently
    # (this used to serve the demo model with "/some/model" as a second API key).
    (["--api-key", "k1", "/some/model"], "the following arguments are required: MODEL"),
    (["--served-model-name", "a", "b"], "the following arguments are required: MODEL"),
    ([], "the following arguments are required: MODEL"),
    (["--kv-cache-memory", "lots"], "not a size: 'lots'"),
    (["demo", "--pipeline-parallel-size", "2"],
     "unrecognized arguments: --pipeline-parallel-size"),
    (["demo", "-tp", "0"], "tensor_parallel_size must be at least 1"),
    (["--max-num-seqs", "x"], "invalid int value"),
])
def test_bad_flags_are_refused_by_name(argv: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "vserve.cli.main", "serve", *argv],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr


def test_validation_runs_on_cli_values_too() -> None:
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        parse("demo", "--block-size", "3")
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineConfig.from_options(scheduling_policy="lifo")


def test_llm_options_are_the_engine_options() -> None:
    """LLM(**kwargs) takes exactly the engine options, by field name."""
    every = {f.name: dataclasses.MISSING for _, f, _ in option_fields(EngineConfig)}
    assert {"model", "served_model_name", "max_num_seqs", "kv_cache_memory_bytes",
            "scheduling_policy", "device"} <= set(every)
    cfg = EngineConfig.from_options(model="m", served_model_name=["x"], max_num_seqs=3,
                                    enforce_eager=True)
    assert cfg.model.served_model_name == ("x",) and cfg.scheduler.max_num_seqs == 3
    assert cfg.device.enforce_eager is True
    with pytest.raises(TypeError, match="unknown option.*no_such_option"):
        EngineConfig.from_options(no_such_option=1)
    with pytest.raises(TypeError, match="api_server_count"):  # a server option, not LLM's
        EngineConfig.from_options(api_server_count=2)


def test_configs_travel_as_msgpack() -> None:
    cfg = parse("m", "--served-model-name", "x", "--max-num-queued-reqs", "4")
    assert ServeConfig.from_msgpack(cfg.to_msgpack()) == cfg
    assert EngineConfig.from_msgpack(cfg.engine.to_msgpack()) == cfg.engine


def test_sizes() -> None:
    assert parse_size("4GiB") == 4 << 30 and parse_size("1e9") == 10**9
    assert parse_size("512 MiB") == 512 << 20 and parse_size("100") == 100
    with pytest.raises(ValueError):
        parse_size("4 parsecs")
    assert format_size(1 << 30) == "1GiB" and format_size(1000) == "1000"


def test_every_bench_option_has_help_and_its_default_shows() -> None:
    from vserve.bench.cli import add_bench_args

    root = argparse.ArgumentParser()
    add_bench_args(root)
    sub = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    bench = sub.choices["serve"]
    text = " ".join(bench.format_help().split())
    for action in bench._actions:
        if action.dest == "help":
            continue
        assert action.help, f"--{action.dest} has no help"
        if action.default not in (None, False, [], argparse.SUPPRESS):
            assert f"(default: {action.default})" in text or "default" in action.help, \
                action.dest
    proc = subprocess.run([sys.executable, "-m", "vserve.cli.main", "serve", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert "(default: 8000)" in proc.stdout and "MODEL" in proc.stdout
