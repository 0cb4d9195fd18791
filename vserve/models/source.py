"""Where a model's files come from: a local directory, the built-in demo, or the hub.

Torch-free on purpose: the supervisor and a user's ``LLM`` script resolve the model here and
never load torch themselves (only engines do).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

from vserve.roles import DEMO_BUILDER_MODULE, child_command

logger = logging.getLogger(__name__)

# Only what serving needs: configs, safetensors, tokenizer files, chat templates — never
# *.bin / *.pt pickles.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]


def resolve_model_dir(model: str, revision: str | None = None) -> Path:
    """A local directory as is; ``demo`` → the built-in demo model; else a hub download."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model == "demo":
        return demo_model_dir()
    try:
        from huggingface_hub import snapshot_download

        # huggingface_hub draws progress bars on a terminal; say what is happening anyway.
        logger.info("fetching %s%s from the Hugging Face hub (cached files are reused)",
                    model, f" at {revision}" if revision else "")
        t0 = time.monotonic()
        local = snapshot_download(repo_id=model, revision=revision, allow_patterns=_HUB_PATTERNS)
        logger.info("%s is in %s (%.1fs)", model, local, time.monotonic() - t0)
    except Exception as exc:
        raise ValueError(
            f"Model {model!r} is neither a local directory nor downloadable from the Hugging "
            f"Face hub (offline?): {exc}"
        ) from exc
    return Path(local)


def demo_model_dir() -> Path:
    """The built-in demo model's directory, built on first use.

    The build writes random weights with torch. A process that has not loaded torch (the
    supervisor, an ``LLM`` script) builds in a child (``python -m vserve.models.demo``) so
    that it never maps libtorch; one that has builds in place.
    """
    from vserve.models import demo

    target = demo.default_demo_dir()
    if demo.is_complete(target):
        return target
    if "torch" in sys.modules:
        return demo.build_demo_model(target)
    proc = subprocess.run(child_command(DEMO_BUILDER_MODULE, [str(target)]),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0 or not demo.is_complete(target):
        raise RuntimeError(f"building the demo model in {target} failed "
                           f"(exit {proc.returncode}):\n{proc.stderr.strip()}")
    return target
