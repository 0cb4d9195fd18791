"""vserve's process roles: the module each child runs as, the name it logs under, and how
to tell one from its command line (for the process metrics, tests and benchmarks).

Every child is ``python -m MODULE ...`` (see ``vserve.launch.lifetime.spawn_child``), so the
command line names the role, and the index follows a flag of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

API_SERVER_MODULE = "vserve.api.server"
ENGINE_MODULE = "vserve.engine.core_proc"
DEMO_BUILDER_MODULE = "vserve.models.demo"

API_SERVER_INDEX_FLAG = "--index"
ENGINE_INDEX_FLAG = "--engine-index"

_ROLES = ((API_SERVER_MODULE, "api_server", API_SERVER_INDEX_FLAG),
          (ENGINE_MODULE, "engine", ENGINE_INDEX_FLAG))


def api_server_name(index: int) -> str:
    """How API server ``index`` names itself in logs and ``ps``."""
    return f"ApiServer_{index}"


def engine_name(rank: int) -> str:
    """How engine core ``rank`` names itself in logs and ``ps``."""
    return f"EngineCore_DP{rank}"


def process_role(cmdline: Sequence[str]) -> tuple[str, str] | None:
    """``(role, index)`` of a vserve child from its command line — role ``api_server`` or
    ``engine`` — or None for any other process."""
    args = list(cmdline)
    for module, role, flag in _ROLES:
        if module in args:
            at = args.index(flag) if flag in args else -1
            index = args[at + 1] if 0 <= at < len(args) - 1 else "0"
            return role, index
    return None
