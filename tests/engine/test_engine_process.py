"""The engine-core process on its own: real process, real ZMQ, hostile frames."""

from __future__ import annotations

import time

import msgspec
import pytest
import zmq

from vserve.config import CacheConfig, EngineConfig, ModelConfig
from vserve.launch.engines import EngineLauncher, EngineStartupFailed
from vserve.launch.rundir import ipc_endpoint, make_run_dir, remove_run_dir
from vserve.models.demo import build_demo_model
from vserve.protocol import encode
from vserve.protocol.outputs import EngineCoreOutputs, EngineOutput, EngineStats, FinishReason
from vserve.protocol.requests import (
    AbortRequests,
    AddRequests,
    EngineAnnounce,
    EngineCoreRequest,
    GetStats,
    engine_identity,
)
from vserve.protocol.sampling import SamplingParams

_decoder = msgspec.msgpack.Decoder(EngineOutput)


def _step_outputs(frame: bytes) -> list:
    msg = _decoder.decode(frame)
    assert isinstance(msg, EngineCoreOutputs), msg
    return msg.unpack()


@pytest.fixture()
def engine(tmp_path):
    model_dir = build_demo_model(tmp_path / "demo")
    run_dir = make_run_dir()
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind(ipc_endpoint(run_dir, "in"))
    pull = ctx.socket(zmq.PULL)
    pull.bind(ipc_endpoint(run_dir, "out"))
    config = EngineConfig(model=ModelConfig(max_model_len=1024),
                          cache=CacheConfig(num_kv_blocks=64))
    launcher = EngineLauncher(ctx=ctx, config=config,
                              model_dir=model_dir, handshake_addr=ipc_endpoint(run_dir, "hs"),
                              input_addrs=[ipc_endpoint(run_dir, "in")],
                              output_addrs=[ipc_endpoint(run_dir, "out")],
                              engine_ranks=[0], num_engines=1)
    try:
        launcher.start_processes()
        launcher.wait_ready(120)
        assert router.poll(30_000)
        peer, frame = router.recv_multipart()
        assert peer == engine_identity(0)
        assert msgspec.msgpack.decode(frame, type=EngineAnnounce) == EngineAnnounce(
            0, launcher.procs[0].pid)
        yield router, pull, launcher
    finally:
        launcher.shutdown()
        ctx.destroy(linger=0)
        remove_run_dir(run_dir)


def _run(router, pull, rid: str, max_tokens: int = 4) -> list[int]:
    req = EngineCoreRequest(rid, [1, 2, 3, 4, 5], SamplingParams(temperature=0,
                                                                 max_tokens=max_tokens),
                            [296], time.time())
    router.send_multipart([engine_identity(0), encode(AddRequests([req]))])
    tokens: list[int] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not pull.poll(1000):
            continue
        for out in _step_outputs(pull.recv()):
            assert out.request_id == rid
            tokens += out.new_token_ids
            if out.finished:
                assert out.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
                return tokens
    raise TimeoutError(rid)


def test_malformed_frames_are_dropped_and_the_engine_keeps_serving(engine):
    router, pull, launcher = engine
    before = _run(router, pull, "before")
    target = engine_identity(0)
    garbage = [
        [b"not msgpack at all \xff\xfe"],
        [msgspec.msgpack.encode({"request_id": 5})],  # wrong shape
        [msgspec.msgpack.encode(["add", "id", [1, 2], {"temperature": -5}, [2], 0.0])],
        [msgspec.msgpack.encode(["abort", 12345])],  # ABORT with a non-list
        [msgspec.msgpack.encode(["no-such-kind", 1])],
        [encode(AbortRequests(["x"])), b"two frames"],
        [msgspec.msgpack.encode(["stats", "not an int", 0])],
        [b"\x93\x01\x02"],
    ]
    for frames in garbage:
        router.send_multipart([target, *frames])
    # An invalid request that decodes fine is answered with an error, not a crash.
    bad = EngineCoreRequest("bad", [10**7], SamplingParams(), [296], time.time())
    router.send_multipart([target, encode(AddRequests([bad]))])
    assert pull.poll(10_000)
    outs = _step_outputs(pull.recv())
    assert outs[0].request_id == "bad" and outs[0].finish_reason == FinishReason.ERROR
    assert "vocabulary" in (outs[0].error or "")
    after = _run(router, pull, "after")
    assert after == before  # greedy: same prompt, same tokens
    assert launcher.dead_engines() == []


def test_abort_frees_the_request(engine):
    router, pull, launcher = engine
    req = EngineCoreRequest("long", [1, 2, 3], SamplingParams(max_tokens=3000, ignore_eos=True),
                            [296], time.time())
    router.send_multipart([engine_identity(0), encode(AddRequests([req]))])
    assert pull.poll(10_000)
    router.send_multipart([engine_identity(0), encode(AbortRequests(["long"]))])
    deadline = time.monotonic() + 10
    finished = None
    while finished is None and time.monotonic() < deadline:
        if pull.poll(1000):
            for out in _step_outputs(pull.recv()):
                if out.finished:
                    finished = out.finish_reason
    assert finished == FinishReason.ABORT
    # 64 blocks of 16 tokens: a request needing most of the cache runs only if the aborted
    # one gave its blocks back.
    assert len(_run(router, pull, "big", max_tokens=900)) == 900


def test_startup_error_names_the_cause(tmp_path):
    model_dir = build_demo_model(tmp_path / "demo")
    run_dir = make_run_dir()
    ctx = zmq.Context()
    launcher = EngineLauncher(ctx=ctx, config=EngineConfig(cache=CacheConfig(num_kv_blocks=2)),
                              model_dir=model_dir, handshake_addr=ipc_endpoint(run_dir, "hs"),
                              input_addrs=[ipc_endpoint(run_dir, "in")],
                              output_addrs=[ipc_endpoint(run_dir, "out")],
                              engine_ranks=[0], num_engines=1)
    try:
        launcher.start_processes()
        with pytest.raises(EngineStartupFailed, match="KV cache capacity"):
            launcher.wait_ready(120)
    finally:
        launcher.shutdown()
        ctx.destroy(linger=0)
        remove_run_dir(run_dir)


def test_duplicate_request_id_is_refused_not_fatal(engine):
    router, pull, launcher = engine
    req = EngineCoreRequest("dup", [1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True),
                            [296], time.time())
    for _ in range(2):
        router.send_multipart([engine_identity(0), encode(AddRequests([req]))])
    errors, finished = [], 0
    deadline = time.monotonic() + 30
    while finished < 2 and time.monotonic() < deadline:
        if pull.poll(1000):
            for out in _step_outputs(pull.recv()):
                if out.finish_reason == FinishReason.ERROR:
                    errors.append(out.error)
                if out.finished:
                    finished += 1
    assert len(errors) == 1 and "dup" in (errors[0] or "")
    assert finished == 2  # the first one ran to completion
    assert _run(router, pull, "still-alive")
    assert launcher.dead_engines() == []


def test_stats_are_answered_to_the_asking_client(engine):
    router, pull, _ = engine
    _run(router, pull, "counted", max_tokens=3)
    router.send_multipart([engine_identity(0), encode(GetStats(7, 0))])
    assert pull.poll(10_000)
    reply = _decoder.decode(pull.recv())
    assert isinstance(reply, EngineStats) and reply.call_id == 7
    assert reply.stats.generation_tokens_total >= 3
    assert reply.stats.num_running_reqs == 0
