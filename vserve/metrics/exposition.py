"""``/metrics``: the whole server's view from any API server.

The registry built per scrape merges every process's multiprocess files (counters and
histograms summed, engine gauges once per engine) and adds process metrics for every local
vserve process, read from /proc through psutil at scrape time — prometheus_client's own
process collector only sees the scraping process in multiprocess mode.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import psutil
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vserve import envs
from vserve.metrics.request_metrics import HTTP_DURATION, HTTP_REQUESTS
from vserve.roles import process_role


class VserveProcessCollector(Collector):
    """CPU seconds, resident memory and open fds of the supervisor and all its children."""

    def __init__(self, supervisor_pid: int) -> None:
        self.supervisor_pid = supervisor_pid

    def collect(self) -> Iterator[Metric]:
        labels = ["role", "index"]
        cpu = CounterMetricFamily("vserve_process_cpu_seconds",
                                  "CPU time (user + system) of a vserve process.", labels=labels)
        rss = GaugeMetricFamily("vserve_process_resident_memory_bytes",
                                "Resident memory of a vserve process.", labels=labels)
        fds = GaugeMetricFamily("vserve_process_open_fds",
                                "Open file descriptors of a vserve process.", labels=labels)
        procs: list[tuple[psutil.Process, tuple[str, str]]] = []
        try:
            root = psutil.Process(self.supervisor_pid)
            procs.append((root, ("supervisor", "0")))
            for child in root.children(recursive=True):
                found = process_role(child.cmdline())
                if found is not None:
                    procs.append((child, found))
        except psutil.Error:
            pass
        for proc, (role, index) in procs:
            try:
                with proc.oneshot():
                    t = proc.cpu_times()
                    cpu.add_metric([role, index], t.user + t.system)
                    rss.add_metric([role, index], proc.memory_info().rss)
                    fds.add_metric([role, index], proc.num_fds())
            except psutil.Error:
                continue  # it exited between listing and reading
        yield from (cpu, rss, fds)


def metrics_response(supervisor_pid: int) -> Response:
    registry = CollectorRegistry()
    path = envs.prometheus_multiproc_dir()
    if path:
        MultiProcessCollector(registry, path=path)
    registry.register(VserveProcessCollector(supervisor_pid))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def add_metrics_route(app: ASGIApp, supervisor_pid: int) -> None:
    async def metrics(_: Request) -> Response:
        return metrics_response(supervisor_pid)

    app.add_route("/metrics", metrics, methods=["GET"], include_in_schema=False)  # type: ignore[attr-defined]


def with_http_metrics(app: ASGIApp) -> ASGIApp:
    """Count every HTTP response by method, route template and status.

    The route is the matched route's path template (``/v1/completions``), or ``other`` for
    unmatched paths, so that random URLs cannot blow up the label cardinality.
    """

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            method = scope.get("method", "GET")
            HTTP_REQUESTS.labels(method, route, str(status[0])).inc()
            HTTP_DURATION.labels(method, route).observe(time.perf_counter() - start)

    return wrapped


def mark_process_dead(pid: int) -> None:
    """Remove a dead process's live gauges (its counters stay: they never go backwards)."""
    path = envs.prometheus_multiproc_dir()
    if path and os.path.isdir(path):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)
