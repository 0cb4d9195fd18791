"""Prometheus metrics through `vserve serve` with several API servers and engines: exact
totals from any API server, one series per engine, valid exposition, and correct behaviour
when an API server dies and is replaced."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
from helpers.serve import serve
from prometheus_client.parser import text_string_to_metric_families


def scrape(base: str) -> tuple[str, dict[str, list[tuple[dict[str, str], float]]]]:
    """One scrape on a fresh connection: (answering API server, name → [(labels, value)])."""
    with httpx.Client(timeout=10) as c:
        r = c.get(base + "/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    series: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(r.text):  # raises on invalid exposition
        for s in family.samples:
            series[s.name].append((s.labels, s.value))
    return r.headers["x-vserve-api-server"], series


def total(series, name: str, **labels: str) -> float:
    return sum(v for lab, v in series.get(name, [])
               if all(lab.get(k) == val for k, val in labels.items()))


def scrape_each_server(base: str, count: int) -> dict[str, dict]:
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 30
    while len(seen) < count and time.monotonic() < deadline:
        server, series = scrape(base)
        seen.setdefault(server, series)
    assert len(seen) == count, f"only API servers {sorted(seen)} answered scrapes"
    return seen


def test_exact_totals_from_every_api_server():
    with serve("demo", "--api-server-count", "3", "--data-parallel-size", "2") as srv:
        base = srv.base_url
        _, before = scrape(base)
        assert total(before, "vserve_request_success_total") == 0
        assert " with 3 API servers and 2 engines\n" in srv.log()
        # Declared from the start, so that rate() sees the first rejection too.
        reasons = {lab["reason"]: value for lab, value in
                   before["vserve_requests_rejected_total"]}
        assert reasons == dict.fromkeys(
            ("overloaded", "draining", "not_ready", "restarting", "unhealthy"), 0.0), reasons

        def one(i: int) -> tuple[int, int]:
            with httpx.Client(timeout=60) as c:
                if i % 3 == 0:  # streaming, usage in the final chunk
                    prompt = completion = 0
                    with c.stream("POST", base + "/v1/completions", json={
                            "prompt": "x" * (i + 1), "max_tokens": 3 + i % 5, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
                        for line in r.iter_lines():
                            if line.startswith("data: {") and '"usage":{' in line.replace(
                                    " ", ""):
                                import json

                                usage = json.loads(line[6:])["usage"]
                                if usage:
                                    prompt = usage["prompt_tokens"]
                                    completion = usage["completion_tokens"]
                    return prompt, completion
                r = c.post(base + "/v1/completions",
                           json={"prompt": "y" * (i + 1), "max_tokens": 2 + i % 7})
                assert r.status_code == 200
                return r.json()["usage"]["prompt_tokens"], r.json()["usage"]["completion_tokens"]

        num = 30
        with ThreadPoolExecutor(8) as pool:
            usages = list(pool.map(one, range(num)))
        assert all(p > 0 and c > 0 for p, c in usages), usages
        prompt_total = sum(p for p, _ in usages)
        completion_total = sum(c for _, c in usages)
        time.sleep(1.5)  # engine gauges refresh after the last step
        per_server = scrape_each_server(base, 3)
        for server, series in per_server.items():
            assert total(series, "vserve_request_success_total", model_name="demo") == num, server
            assert total(series, "vserve_prompt_tokens_total") == prompt_total, server
            assert total(series, "vserve_generation_tokens_total") == completion_total, server
            assert total(series, "vserve_request_prompt_tokens_count") == num
            assert total(series, "vserve_time_to_first_token_seconds_count") == num
            # One gap per token after a request's first (fewer where a step delivered several).
            gaps = total(series, "vserve_inter_token_latency_seconds_count")
            assert 0 < gaps <= completion_total - num, (gaps, completion_total)
            assert total(series, "vserve_inter_token_latency_seconds_sum") > 0
            assert total(series, "vserve_http_requests_total", route="/v1/completions",
                         status="200") == num
            for gauge in ("vserve_num_requests_running", "vserve_num_requests_waiting",
                          "vserve_kv_cache_usage_ratio"):
                engines = sorted(lab["engine"] for lab, _ in series[gauge])
                assert engines == ["0", "1"], (gauge, series[gauge])
            assert total(series, "vserve_num_requests_running") == 0
            info = {lab["engine"]: lab for lab, value in series["vserve_cache_config_info"]
                    if value == 1}
            assert sorted(info) == ["0", "1"], series["vserve_cache_config_info"]
            for lab in info.values():
                assert lab["block_size"] == "16" and lab["enable_prefix_caching"] == "true"
                assert lab["cache_dtype"] == "float32", lab  # the demo model's, on the CPU
                assert f"{lab['num_gpu_blocks']} KV blocks of 16 tokens" in srv.log()
            queries = [lab["engine"] for lab, _ in series["vserve_prefix_cache_queries_total"]]
            assert sorted(queries) == ["0", "1"]
            roles = defaultdict(set)
            for lab, _ in series["vserve_process_resident_memory_bytes"]:
                roles[lab["role"]].add(lab["index"])
            assert roles == {"supervisor": {"0"}, "api_server": {"0", "1", "2"},
                             "engine": {"0", "1"}}
            assert all(lab.get("model_name") == "demo"
                       for name in ("vserve_request_success_total",
                                    "vserve_e2e_request_latency_seconds_count")
                       for lab, _ in series[name])


def test_counters_survive_an_api_server_death_and_its_gauges_go():
    with serve("demo", "--api-server-count", "2") as srv:
        base = srv.base_url
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: httpx.post(base + "/v1/completions",
                                               json={"prompt": "z", "max_tokens": 3},
                                               timeout=60), range(12)))
        time.sleep(0.5)
        _, before = scrape(base)
        done_before = total(before, "vserve_request_success_total")
        assert done_before == 12
        # Long requests in flight on both servers, then one server is killed.
        stop = threading.Event()

        def long_request() -> None:
            try:
                httpx.post(base + "/v1/completions", json={
                    "prompt": "long", "max_tokens": 4000, "ignore_eos": True}, timeout=120)
            except httpx.HTTPError:
                pass

        threads = [threading.Thread(target=long_request) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # all admitted; 4,000 tokens last well over a second on two cores
        _, during = scrape(base)
        assert total(during, "vserve_num_requests_in_flight") > 0
        api = sorted(pid for pid, role in srv.process_names().items() if role == "api_server")
        os.kill(api[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = {pid for pid, role in srv.process_names().items() if role == "api_server"}
            if len(now) == 2 and api[0] not in now:
                break
            time.sleep(0.1)
        for t in threads:
            t.join(120)
        stop.set()
        time.sleep(1.0)
        last_success = done_before
        for _ in range(6):  # several scrapes, whichever server answers
            _, after = scrape(base)
            done = total(after, "vserve_request_success_total")
            assert done >= last_success, "a counter went backwards"
            last_success = done
            # The dead server's in-flight gauge is gone: nothing is in flight any more.
            assert total(after, "vserve_num_requests_in_flight") == 0
            assert total(after, "vserve_prompt_tokens_total") >= total(
                before, "vserve_prompt_tokens_total")
        assert psutil.pid_exists(api[0]) is False or psutil.Process(api[0]).status() == \
            psutil.STATUS_ZOMBIE


def test_stats_log_line_aggregates_all_engines():
    with serve("demo", "--api-server-count", "2", "--data-parallel-size", "2",
               "--log-stats-interval", "1") as srv:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: httpx.post(srv.base_url + "/v1/completions",
                                               json={"prompt": "p", "max_tokens": 40,
                                                     "ignore_eos": True}, timeout=60),
                          range(16)))
        time.sleep(2.5)
        lines = [line for line in srv.log().splitlines() if "Avg generation throughput" in line]
        assert lines and all("Engines: 2" in line for line in lines)
        assert "(vserve pid=" in lines[0]
        assert any(float(line.split("Avg generation throughput: ")[1].split()[0]) > 0
                   for line in lines)
