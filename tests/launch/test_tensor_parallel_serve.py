"""``vserve serve demo -tp 2`` end to end: the official client gets the tokens TP=1 gives; a
worker rank's death is its engine's death (the engine is replaced, with a new worker, and
serving goes on); shutting down leaves no worker behind."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import psutil
from helpers.serve import serve

from vserve import LLM, SamplingParams

PROMPTS = ["Hello, my name is", "The capital of France is"]


def _workers(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True)
            if "vserve.engine.tp_worker" in " ".join(p.cmdline())]


def _complete(client: openai.OpenAI) -> list[str]:
    return [client.completions.create(model="demo", prompt=p, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
            for p in PROMPTS]


def test_serve_tp2_answers_like_tp1_and_survives_a_worker_death() -> None:
    with LLM("demo") as llm:
        want = [o.outputs[0].text for o in llm.generate(
            PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
            use_tqdm=False)]
    with serve("demo", "--tensor-parallel-size", "2") as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0)
        assert _complete(client) == want
        workers = _workers(srv.pid)
        assert len(workers) == 1, [p.cmdline() for p in workers]
        engine = psutil.Process(workers[0].ppid())
        assert "vserve.engine.core_proc" in " ".join(engine.cmdline())
        # The worker is a vserve process of its own in the process metrics.
        scrape = httpx.get(srv.base_url + "/metrics", timeout=10).text
        assert 'vserve_process_resident_memory_bytes{index="0.1",role="engine_tp_worker"}' \
            in scrape, [line for line in scrape.splitlines() if "resident" in line]

        os.kill(workers[0].pid, signal.SIGKILL)
        engine.wait(30)  # the worker's death ends its engine ...
        deadline = time.monotonic() + 90
        while True:  # ... which the supervisor replaces, with a worker of its own
            fresh = [w for w in _workers(srv.pid) if w.pid != workers[0].pid]
            try:
                if fresh and _complete(client) == want:
                    break
            except openai.APIError:
                pass
            assert time.monotonic() < deadline, srv.log()[-3000:]
            time.sleep(0.5)
        assert "tensor-parallel rank 1" in srv.log()
        every = psutil.Process(srv.pid).children(recursive=True)
    gone, alive = psutil.wait_procs(every, timeout=15)
    assert not alive, [p.cmdline() for p in alive]


def test_dp2_tp2_serves_on_both_engines_and_leaves_nothing_when_the_supervisor_dies() -> None:
    """Two engines of two ranks each; the supervisor SIGKILLed (no cleanup of its own):
    engines and their workers go too, and no rendezvous directory stays behind."""
    rendezvous = set(Path(tempfile.gettempdir()).glob("vserve-tp-*"))
    with serve("demo", "-dp", "2", "-tp", "2", "--max-num-seqs", "4") as srv:
        workers = _workers(srv.pid)
        assert sorted(w.cmdline()[w.cmdline().index("--engine-index") + 1]
                      for w in workers) == ["0", "1"], [w.cmdline() for w in workers]
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0)
        with ThreadPoolExecutor(8) as pool:  # concurrent: routed to both engines
            texts = list(pool.map(lambda _: client.completions.create(
                model="demo", prompt="Hello", max_tokens=32, temperature=0,
                extra_body={"ignore_eos": True}).choices[0].text, range(8)))
        assert len(set(texts)) == 1  # two engines, one model: the same greedy text
        scrape = httpx.get(srv.base_url + "/metrics", timeout=10).text
        served = {line.split('engine="')[1].split('"')[0] for line in scrape.splitlines()
                  if line.startswith("vserve_prefix_cache_queries_total{")
                  and not line.endswith(" 0.0")}
        assert served == {"0", "1"}, served
        every = psutil.Process(srv.pid).children(recursive=True)
        os.kill(srv.pid, signal.SIGKILL)
        gone, alive = psutil.wait_procs(every, timeout=20)
        assert not alive, [p.cmdline() for p in alive]
    assert set(Path(tempfile.gettempdir()).glob("vserve-tp-*")) == rendezvous
