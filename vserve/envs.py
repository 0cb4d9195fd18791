"""The one place vserve reads environment variables.

Everything else gets configuration passed down; modules never call ``os.environ`` on their
own. Names are listed here so that users (and docs) find them all in one place.
"""

from __future__ import annotations

import os

# Set by the supervisor for its children (prometheus_client's multiprocess mode reads it).
PROMETHEUS_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
# Accepted as an API key in addition to --api-key.
VSERVE_API_KEY = "VSERVE_API_KEY"


def default_host() -> str:
    """`vserve serve --host` default: loopback, unless the environment (e.g. the container
    image, where arguments replace the default command) says otherwise."""
    return os.environ.get("VSERVE_HOST") or "127.0.0.1"


def api_key() -> str | None:
    """``$VSERVE_API_KEY``; set but empty is returned as "" (and refused at startup)."""
    return os.environ.get(VSERVE_API_KEY)


def client_api_key() -> str | None:
    """The key ``vserve bench serve`` sends when not given one: ``$VSERVE_API_KEY``, else
    ``$OPENAI_API_KEY`` (what OpenAI clients read)."""
    return os.environ.get(VSERVE_API_KEY) or os.environ.get("OPENAI_API_KEY") or None


def engine_ready_timeout() -> float:
    """Seconds to wait for every engine's READY (loading a large model takes a while)."""
    return float(os.environ.get("VSERVE_ENGINE_READY_TIMEOUT", "1800"))


def engine_death_grace() -> float:
    """Seconds between failing a dead engine's requests and stopping everything, so that
    clients receive their errors and /health reports 503 before the port closes."""
    return float(os.environ.get("VSERVE_ENGINE_DEATH_GRACE", "2"))


def set_prometheus_multiproc_dir(path: os.PathLike[str] | str) -> None:
    """The supervisor sets it for itself and every child it starts afterwards."""
    os.environ[PROMETHEUS_MULTIPROC_DIR] = str(path)


def triton_interpret() -> bool:
    """Triton's own interpreter switch (TRITON_INTERPRET=1): kernels run on the CPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_on_cpu() -> bool:
    """Route CPU tensors through the Triton kernels (with TRITON_INTERPRET=1): for testing
    the kernels themselves on a machine without a GPU."""
    return os.environ.get("VSERVE_TRITON_ON_CPU") == "1"


def gemv_enabled() -> bool:
    """VSERVE_GEMV=0 turns off the Triton matrix-vector kernels (cuBLAS everywhere)."""
    return os.environ.get("VSERVE_GEMV", "1") != "0"


def pdl_enabled() -> bool:
    """VSERVE_PDL=0 turns off programmatic dependent launch of the decode-step kernels."""
    return os.environ.get("VSERVE_PDL", "1") != "0"


def prometheus_multiproc_dir() -> str | None:
    return os.environ.get(PROMETHEUS_MULTIPROC_DIR) or None


def omp_num_threads() -> int | None:
    """``$OMP_NUM_THREADS`` when set to a positive integer: the user sized torch's CPU
    threads themselves, and engines keep that instead of sizing them."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None
