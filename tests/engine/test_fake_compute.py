"""Benchmark mode's simulated device (``--benchmark-step-ms``): steps are paced by it, the
fake tokens do not change, and the option is refused without ``--benchmark-skip-compute``."""

from __future__ import annotations

import time

import pytest

from vserve.config import DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig
from vserve.engine.core import EngineCore
from vserve.models.source import resolve_model_dir
from vserve.protocol.requests import EngineCoreRequest
from vserve.protocol.sampling import SamplingParams


def _run(step_ms: float, async_scheduling: bool) -> tuple[dict[str, list[int]], int, float]:
    d = resolve_model_dir("demo")
    core = EngineCore(EngineConfig(
        model=ModelConfig(model=str(d)),
        device=DeviceConfig(device="cpu", benchmark_skip_compute=True,
                            benchmark_step_ms=step_ms),
        scheduler=SchedulerConfig(async_scheduling=async_scheduling)), d)
    for i in range(4):
        params = SamplingParams(max_tokens=12 + i, ignore_eos=True,
                                temperature=0.0 if i % 2 else 1.0, seed=i)
        assert core.add_request(EngineCoreRequest(f"r{i}", [1, 2, 3 + i], params, [296],
                                                  time.time())) is None
    tokens: dict[str, list[int]] = {}
    steps = 0
    t0 = time.perf_counter()
    while core.has_unfinished_requests():
        outs = core.step()
        steps += 1
        for o in outs.values():
            for out in o.unpack():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens, steps, time.perf_counter() - t0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_simulated_device_paces_the_steps(async_scheduling: bool) -> None:
    plain, _, _ = _run(0.0, async_scheduling)
    paced, steps, wall = _run(20.0, async_scheduling)
    assert paced == plain and {len(t) for t in plain.values()} == {12, 13, 14, 15}
    # Every step's tokens wait for the device: never faster than one step per 20 ms (the
    # first step's tokens come 20 ms after its launch, chained or not).
    assert wall >= steps * 0.020 - 0.005, (steps, wall)


def test_step_ms_is_refused_alone_or_negative() -> None:
    with pytest.raises(ValueError, match="benchmark_step_ms needs benchmark_skip_compute"):
        DeviceConfig(benchmark_step_ms=1.0)
    with pytest.raises(ValueError, match="benchmark_step_ms must not be negative"):
        DeviceConfig(benchmark_skip_compute=True, benchmark_step_ms=-1.0)
