"""What every route of one API server can reach: built once at startup, then read-only
except for the lifecycle flags."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from vserve.config import EngineConfig, ServerConfig
from vserve.frontend.async_client import AsyncEngineClient
from vserve.frontend.tokenizer import Tokenizer
from vserve.launch.admission import AdmissionLedger


@dataclass
class ServerState:
    client_index: int
    engine_config: EngineConfig
    server_config: ServerConfig
    engine_client: AsyncEngineClient
    tokenizer: Tokenizer
    model_names: list[str]  # served names; the first is the one reported in responses
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    # SamplingParams defaults for unset request fields (--generation-config).
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    ready: bool = False  # every engine connected and the socket is being served
    draining: bool = False  # SIGTERM: finish what is in flight, take nothing new
    # HTTP requests whose responses are not fully sent yet (probes and /metrics excluded):
    # a drain waits for these, not only for the engine's work, so that a slow reader still
    # gets its last chunks.
    http_in_flight: int = 0
    # Set when --max-num-queued-reqs is: every API server's admitted sequences.
    admission: AdmissionLedger | None = None

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    @property
    def healthy(self) -> bool:
        """Liveness: some engine serves, or a dead one is being replaced."""
        return self.engine_client.healthy

    @property
    def accepting(self) -> bool:
        """Readiness: ready, some engine serving, not draining."""
        return self.ready and self.engine_client.serving and not self.draining
