"""Request and HTTP metrics, counted by the API server that owns the request.

Counters and histograms from all API servers are summed by the multiprocess collector; a
dead server's files stay behind (counters never go backwards), only its live gauges are
removed when the supervisor marks it dead.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from vserve.protocol.outputs import RequestTiming

_M = ["model_name"]
_LATENCY = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
            7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0]
_ITL = [0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
        0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0]
_TOKENS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]

PROMPT_TOKENS = Counter("vserve_prompt_tokens", "Prompt tokens of finished requests.", _M)
GENERATION_TOKENS = Counter("vserve_generation_tokens", "Generated tokens of finished requests.",
                            _M)
REQUEST_SUCCESS = Counter("vserve_request_success",
                          "Finished requests by finish reason (stop, length, abort).",
                          [*_M, "finished_reason"])
REQUESTS_REJECTED = Counter("vserve_requests_rejected",
                            "Requests refused before reaching an engine (overload, draining).",
                            [*_M, "reason"])
# Every reason a request is refused before an engine (vserve.api.generation).
REJECTION_REASONS = ("overloaded", "draining", "not_ready", "restarting", "unhealthy")
REQUESTS_IN_FLIGHT = Gauge("vserve_num_requests_in_flight",
                           "Requests an API server has sent to engines and not yet finished.",
                           _M, multiprocess_mode="livesum")
TTFT = Histogram("vserve_time_to_first_token_seconds", "Arrival to first token.", _M,
                 buckets=_LATENCY)
ITL = Histogram("vserve_inter_token_latency_seconds", "Time between consecutive tokens.", _M,
                buckets=_ITL)
E2E = Histogram("vserve_e2e_request_latency_seconds", "Arrival to last token.", _M,
                buckets=_LATENCY)
QUEUE_TIME = Histogram("vserve_request_queue_time_seconds",
                       "Time in the engine's waiting queue.", _M, buckets=_LATENCY)
PREFILL_TIME = Histogram("vserve_request_prefill_time_seconds",
                         "First schedule to first token.", _M, buckets=_LATENCY)
DECODE_TIME = Histogram("vserve_request_decode_time_seconds",
                        "First token to last token.", _M, buckets=_LATENCY)
PROMPT_LEN = Histogram("vserve_request_prompt_tokens", "Prompt length per request.", _M,
                       buckets=_TOKENS)
GENERATION_LEN = Histogram("vserve_request_generation_tokens",
                           "Generated tokens per request (all choices).", _M, buckets=_TOKENS)
PARAM_N = Histogram("vserve_request_params_n", "The n parameter.", _M,
                    buckets=[1, 2, 5, 10, 20])
PARAM_MAX_TOKENS = Histogram("vserve_request_params_max_tokens", "The max_tokens parameter.",
                             _M, buckets=_TOKENS)
HTTP_REQUESTS = Counter("vserve_http_requests", "HTTP requests by route and status.",
                        ["method", "route", "status"])
HTTP_DURATION = Histogram("vserve_http_request_duration_seconds",
                          "HTTP request duration by route.", ["method", "route"],
                          buckets=_LATENCY)


@dataclass
class SequenceTimer:
    """Token arrival times of one choice of one request, on the API server's clock."""

    arrival: float = field(default_factory=time.monotonic)
    first_token: float = 0.0
    last_token: float = 0.0
    itls: list[float] = field(default_factory=list)

    def on_tokens(self, count: int) -> None:
        if count <= 0:
            return
        now = time.monotonic()
        if not self.first_token:
            self.first_token = now
        else:
            self.itls.append(now - self.last_token)
        self.last_token = now


def declare_series(model_name: str) -> None:
    """Create the labelled series that would otherwise appear only at their first event, so
    that a scrape sees ``vserve_requests_rejected_total{reason=…} 0`` from the start and
    ``rate()``/``increase()`` count the first rejection too."""
    for reason in REJECTION_REASONS:
        REQUESTS_REJECTED.labels(model_name, reason)


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for each of ``values`` (a labelled child), with one write per
    bucket touched instead of two per value: a request's inter-token gaps are recorded when
    it finishes, and a 128-token request's 127 separate observations cost the API server
    ~280 µs (multiprocess mode writes each to a memory-mapped file), paid by every request
    streaming through it at that moment. Uses prometheus_client's histogram layout
    (``_upper_bounds``, ``_buckets``, ``_sum``; a test compares the exposition with
    separate observations) and falls back to ``observe`` where that layout is missing."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in values:
            histogram.observe(v)
        return
    if not values:
        return
    # observe() counts v in the first bucket whose bound is >= v: bisect_left's index.
    total.inc(sum(values))
    for i, count in Tally(bisect_left(bounds, v) for v in values).items():
        buckets[i].inc(count)


def record_request(model_name: str, *, prompt_tokens: int, generation_tokens: int,
                   finish_reasons: Sequence[str], timers: Sequence[SequenceTimer],
                   timings: Sequence[RequestTiming | None], n: int,
                   max_tokens: int | None) -> None:
    """Record one finished request (all its choices) exactly once."""
    PROMPT_TOKENS.labels(model_name).inc(prompt_tokens)
    GENERATION_TOKENS.labels(model_name).inc(generation_tokens)
    for reason in finish_reasons:
        REQUEST_SUCCESS.labels(model_name, reason).inc()
    PROMPT_LEN.labels(model_name).observe(prompt_tokens)
    GENERATION_LEN.labels(model_name).observe(generation_tokens)
    PARAM_N.labels(model_name).observe(n)
    if max_tokens is not None:
        PARAM_MAX_TOKENS.labels(model_name).observe(max_tokens)
    now = time.monotonic()
    for timer in timers:
        if timer.first_token:
            TTFT.labels(model_name).observe(timer.first_token - timer.arrival)
        observe_many(ITL.labels(model_name), timer.itls)
        E2E.labels(model_name).observe(now - timer.arrival)
    for t in timings:
        if t is None:
            continue
        if t.first_scheduled:
            QUEUE_TIME.labels(model_name).observe(max(0.0, t.first_scheduled - t.received))
        if t.first_token and t.first_scheduled:
            PREFILL_TIME.labels(model_name).observe(max(0.0, t.first_token - t.first_scheduled))
        if t.first_token:
            DECODE_TIME.labels(model_name).observe(max(0.0, t.finished - t.first_token))
