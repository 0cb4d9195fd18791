"""Engine metrics, written by each engine process itself (label ``engine``).

In multiprocess mode every process writes its own files and the API server that answers
``/metrics`` merges them; since exactly one process writes each engine's series, every
engine appears exactly once, whichever API server is scraped. Gauges are ``livemostrecent``:
the supervisor marks a dead process's files dead so its gauges disappear.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from vserve.protocol.outputs import SchedulerStats

_LABELS = ["model_name", "engine"]

NUM_RUNNING = Gauge("vserve_num_requests_running", "Requests in the running batch.",
                    _LABELS, multiprocess_mode="livemostrecent")
NUM_WAITING = Gauge("vserve_num_requests_waiting", "Requests waiting to be scheduled.",
                    _LABELS, multiprocess_mode="livemostrecent")
KV_USAGE = Gauge("vserve_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0..1).",
                 _LABELS, multiprocess_mode="livemostrecent")
PREFIX_QUERIES = Counter("vserve_prefix_cache_queries",
                         "Prompt tokens looked up in the prefix cache.", _LABELS)
PREFIX_HITS = Counter("vserve_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      _LABELS)
PREEMPTIONS = Counter("vserve_num_preemptions", "Requests preempted (recomputed later).",
                      _LABELS)
ENGINE_RESTARTS = Counter(
    "vserve_engine_restarts", "Engines replaced in place, by why the old one went (exited: it "
    "exited on its own; killed: by a signal; hung: it stopped answering and was killed; "
    "startup_failed: its replacement failed to start).", [*_LABELS, "cause"])
CACHE_CONFIG_INFO = Gauge(
    "vserve_cache_config_info", "The engine's KV cache (value 1; the facts are the labels: "
    "block_size, cache_dtype as stored, num_gpu_blocks usable, enable_prefix_caching).",
    [*_LABELS, "block_size", "cache_dtype", "num_gpu_blocks", "enable_prefix_caching"],
    multiprocess_mode="livemostrecent")
ITERATION_TOKENS = Histogram(
    "vserve_iteration_tokens", "Tokens computed per engine step.", _LABELS,
    buckets=[1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384])


class EngineMetrics:
    """Turns the scheduler's cumulative stats into Prometheus series for one engine.

    ``observe_step`` runs every step; ``update`` may run less often (the gauges are read at
    scrape time, the counters take the increments since the last call).
    """

    def __init__(self, model_name: str, engine_index: int, restarted_because: str = "",
                 cache_info: dict[str, str] | None = None) -> None:
        """``cache_info``: the labels of ``vserve_cache_config_info`` past model and engine."""
        labels = {"model_name": model_name, "engine": str(engine_index)}
        if cache_info is not None:
            CACHE_CONFIG_INFO.labels(**labels, **cache_info).set(1)
        # Every cause appears from the start (at 0), so increase() sees the first restart.
        for cause in ("exited", "killed", "hung", "startup_failed"):
            ENGINE_RESTARTS.labels(**labels, cause=cause)
        if restarted_because:
            ENGINE_RESTARTS.labels(**labels, cause=restarted_because).inc()
        self.running = NUM_RUNNING.labels(**labels)
        self.waiting = NUM_WAITING.labels(**labels)
        self.kv_usage = KV_USAGE.labels(**labels)
        self.prefix_queries = PREFIX_QUERIES.labels(**labels)
        self.prefix_hits = PREFIX_HITS.labels(**labels)
        self.preemptions = PREEMPTIONS.labels(**labels)
        self.iteration_tokens = ITERATION_TOKENS.labels(**labels)
        self._last = SchedulerStats()
        self.update(SchedulerStats())

    def observe_step(self, num_scheduled_tokens: int) -> None:
        if num_scheduled_tokens:
            self.iteration_tokens.observe(num_scheduled_tokens)

    def update(self, stats: SchedulerStats) -> None:
        self.running.set(stats.num_running_reqs)
        self.waiting.set(stats.num_waiting_reqs)
        self.kv_usage.set(stats.kv_cache_usage)
        last = self._last
        # The stats' counters are cumulative; Prometheus counters take increments.
        if stats.prefix_cache_queries > last.prefix_cache_queries:
            self.prefix_queries.inc(stats.prefix_cache_queries - last.prefix_cache_queries)
        if stats.prefix_cache_hits > last.prefix_cache_hits:
            self.prefix_hits.inc(stats.prefix_cache_hits - last.prefix_cache_hits)
        if stats.num_preemptions > last.num_preemptions:
            self.preemptions.inc(stats.num_preemptions - last.num_preemptions)
        self._last = stats
