"""vserve's process roles: the module each child runs as, the command that starts it, the
name it logs under, and how to tell one from its command line (for the process metrics,
tests and benchmarks).

Every child runs ``MODULE`` as ``__main__`` in a fresh interpreter (:func:`child_command`),
so its command line names the role, and the index follows a flag of its own.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

API_SERVER_MODULE = "vserve.api.server"
ENGINE_MODULE = "vserve.engine.core_proc"
DEMO_BUILDER_MODULE = "vserve.models.demo"
TP_WORKER_MODULE = "vserve.engine.tp_worker"

API_SERVER_INDEX_FLAG = "--index"
ENGINE_INDEX_FLAG = "--engine-index"
LOCAL_ENGINES_FLAG = "--local-engines"  # an engine's: how many engines share its node
CLUSTER_KEY_FLAG = "--cluster-key-file"  # an engine's: multi-node links are authenticated
TP_RANK_FLAG = "--rank"  # a tensor-parallel worker's rank in its engine's group

_ROLES = ((API_SERVER_MODULE, "api_server", API_SERVER_INDEX_FLAG),
          (ENGINE_MODULE, "engine", ENGINE_INDEX_FLAG))


# ``python -m`` would put the working directory first on sys.path, so a file named like a
# module vserve imports (``grp.py``, ``uuid.py``) in the directory where ``vserve serve`` was
# started would be imported by every child. This drops it (only builtins run before), then
# runs the module as ``python -m`` would.
_RUN_MODULE = ("import sys; sys.path[:1] = [] if sys.path[:1] == [''] else sys.path[:1]; "
               "import runpy; m = sys.argv.pop(1); sys.argv[0] = m; "
               "runpy.run_module(m, run_name='__main__', alter_sys=True)")


def child_command(module: str, args: Sequence[str] = ()) -> list[str]:
    """The command line of a child running ``module`` (as ``__main__``) with ``args``."""
    return [sys.executable, "-c", _RUN_MODULE, module, *args]


def api_server_name(index: int) -> str:
    """How API server ``index`` names itself in logs and ``ps``."""
    return f"ApiServer_{index}"


def engine_name(rank: int) -> str:
    """How engine core ``rank`` names itself in logs and ``ps``."""
    return f"EngineCore_DP{rank}"


def _flag_value(args: list[str], flag: str) -> str:
    at = args.index(flag) if flag in args else -1
    return args[at + 1] if 0 <= at < len(args) - 1 else "0"


def process_role(cmdline: Sequence[str]) -> tuple[str, str] | None:
    """``(role, index)`` of a vserve child from its command line — role ``api_server``,
    ``engine``, or ``engine_tp_worker`` (index ``ENGINE.RANK``) — or None for any other
    process."""
    args = list(cmdline)
    if TP_WORKER_MODULE in args:
        return "engine_tp_worker", f"{_flag_value(args, ENGINE_INDEX_FLAG)}." \
            f"{_flag_value(args, TP_RANK_FLAG)}"
    for module, role, flag in _ROLES:
        if module in args:
            return role, _flag_value(args, flag)
    return None
