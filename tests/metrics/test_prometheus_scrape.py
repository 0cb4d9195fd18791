"""A real Prometheus scrapes a running server (2 API servers, 2 engines) through an API
server's death and an engine's replacement: counters neither reset nor double count, and
no gauge keeps a dead process's value.

Needs Debian's ``prometheus`` binary; CI installs it (``.ci/run``) and sets
``VSERVE_REQUIRE_PROMETHEUS=1`` so that the test fails rather than skips without it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from helpers.serve import free_port, serve, stream_completion, wait_started
from prometheus_client.parser import text_string_to_metric_families

SCRAPE_S = 0.5
STREAMS = 4
# Long enough that a stream is still running when its engine is killed: the demo model
# decodes 2,000-3,000 tokens/s per stream on the 2-core machine (the context is 4,096).
STREAM_TOKENS = 3500
SCRAPE_MS = int(SCRAPE_S * 1000)
COUNTERS = ("vserve_request_success_total", "vserve_generation_tokens_total",
            "vserve_prompt_tokens_total", "vserve_http_requests_total",
            "vserve_prefix_cache_queries_total", "vserve_iteration_tokens_count")


def _prometheus() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("VSERVE_REQUIRE_PROMETHEUS") == "1":
            pytest.fail("prometheus is not installed (apt-get install prometheus)")
        pytest.skip("prometheus is not installed")
    return binary


class Prometheus:
    def __init__(self, binary: str, target: str, workdir: Path) -> None:
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            f"global:\n  scrape_interval: {SCRAPE_MS}ms\n  scrape_timeout: {SCRAPE_MS}ms\n"
            f"scrape_configs:\n  - job_name: vserve\n    static_configs:\n"
            f"      - targets: ['{target}']\n")
        self.log = open(workdir / "prometheus.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.base + "/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and self.proc.poll() is None, \
                (workdir / "prometheus.log").read_text()[-2000:]
            time.sleep(0.2)

    def query(self, promql: str) -> list[dict]:
        r = httpx.get(self.base + "/api/v1/query", params={"query": promql}, timeout=10)
        r.raise_for_status()
        return list(r.json()["data"]["result"])

    def value(self, promql: str) -> float:
        result = self.query(promql)
        assert len(result) == 1, (promql, result)
        return float(result[0]["value"][1])

    def settle(self) -> None:
        """Let a few more scrapes happen."""
        time.sleep(4 * SCRAPE_S + 1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _load(base: str, count: int, tag: str) -> tuple[int, int, int]:
    """``count`` completions, one at a time; (succeeded, prompt tokens, completion tokens)."""
    ok = prompt = completion = 0
    with httpx.Client(timeout=60) as client:
        for i in range(count):
            r = client.post(base + "/v1/completions",
                            json={"prompt": f"{tag} {i}", "max_tokens": 6, "ignore_eos": True})
            assert r.status_code == 200, r.text
            ok += 1
            prompt += r.json()["usage"]["prompt_tokens"]
            completion += r.json()["usage"]["completion_tokens"]
    return ok, prompt, completion


def _busy_engine(base: str) -> str:
    """The index of an engine with a running request, read from /metrics directly."""
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(base + "/metrics", timeout=10).text
        busy = [s.labels["engine"] for f in text_string_to_metric_families(text)
                for s in f.samples if s.name == "vserve_num_requests_running" and s.value > 0]
        if busy:
            return max(busy)
        assert time.monotonic() < deadline, "no engine reports a running request"
        time.sleep(0.02)


def _wait_for(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_counters_survive_process_replacement_without_reset_or_double_count(
        tmp_path: Path) -> None:
    binary = _prometheus()
    with serve("demo", "--api-server-count", "2", "--data-parallel-size", "2") as srv:
        base = srv.base_url
        prom = Prometheus(binary, base.removeprefix("http://"), tmp_path)
        try:
            totals = [0, 0, 0]

            def load(count: int, tag: str) -> None:
                for k, v in enumerate(_load(base, count, tag)):
                    totals[k] += v

            load(20, "before")
            prom.settle()
            # An API server dies; the supervisor starts its replacement on the same socket.
            api = list(srv.pids("api_server").values())
            assert len(api) == 2
            os.kill(api[0], signal.SIGKILL)
            _wait_for(lambda: len(set(srv.pids("api_server").values()) - {api[0]}) == 2,
                      60, "the API server's replacement")
            load(20, "after-api")
            prom.settle()
            # An engine dies under load (its gauges say it is busy); it is replaced in place.
            by_index = srv.pids("engine")
            engines = list(by_index.values())
            assert len(engines) == 2
            with ThreadPoolExecutor(STREAMS) as pool:
                started = threading.Semaphore(0)
                streams = [pool.submit(stream_completion, base, STREAM_TOKENS, 90, f"stream {i}",
                                       started) for i in range(STREAMS)]
                # Kill an engine running a stream (the router may have put every stream on one
                # engine), named by the server's own /metrics as soon as every stream has its
                # first token: waiting for Prometheus's next scrape can outlast a stream.
                wait_started(started, STREAMS)
                victim = by_index[_busy_engine(base)]
                os.kill(victim, signal.SIGKILL)
                results = [f.result() for f in streams]
            assert all(r.done for r in results), results
            assert any(r.error for r in results), results
            _wait_for(lambda: httpx.get(base + "/health", timeout=5).json().get(
                "engines_down") == [] and len(
                    set(srv.pids("engine").values()) - set(engines)) == 1, 90,
                "the engine's replacement")
            load(20, "after-engine")
            prom.settle()

            ok, prompt_tokens, completion_tokens = totals
            # Exact totals: nothing lost with the dead processes, nothing counted twice (the
            # streams count once each, however they ended).
            assert prom.value('sum(vserve_request_success_total)') == ok + STREAMS
            assert prom.value('sum(vserve_http_requests_total{route="/v1/completions"})') \
                == ok + STREAMS
            streamed = sum(r.chunks for r in results)
            prompt_seen = prom.value('sum(vserve_prompt_tokens_total)') - prompt_tokens
            assert 0 < prompt_seen < STREAMS * 20, prompt_seen
            generated = prom.value('sum(vserve_generation_tokens_total)') - completion_tokens
            # A chunk carries one or more tokens; each stream asked for at most STREAM_TOKENS.
            assert streamed <= generated <= STREAMS * STREAM_TOKENS, (streamed, generated)
            # No counter series ever went down, so rate() and increase() see no false reset.
            for name in COUNTERS:
                series = prom.query(f"resets({name}[10m])")
                assert series, name
                assert all(float(s["value"][1]) == 0 for s in series), (name, series)
            rate = prom.value('sum(increase(vserve_request_success_total[10m]))')
            assert 0 < rate <= ok * 1.5, rate  # extrapolated, never a reset-sized jump
            assert prom.value('sum(vserve_engine_restarts_total)') == 1
            # Gauges: one series per live engine and process, idle now, no ghosts.
            running = prom.query("vserve_num_requests_running")
            assert sorted(s["metric"]["engine"] for s in running) == ["0", "1"], running
            assert all(float(s["value"][1]) == 0 for s in running), running
            assert prom.value('sum(vserve_num_requests_in_flight)') == 0
            rss = prom.query("vserve_process_resident_memory_bytes")
            roles = sorted((s["metric"]["role"], s["metric"]["index"]) for s in rss)
            assert roles.count(("engine", "0")) == 1 and roles.count(("engine", "1")) == 1, roles
            assert [r for r in roles if r[0] == "api_server"] == [
                ("api_server", "0"), ("api_server", "1")], roles
            assert prom.value('count(up{job="vserve"} == 1)') == 1
        finally:
            prom.stop()
