"""API-server processes stay light: no torch, no transformers (the issue's note; RSS ~70 MB)."""

from __future__ import annotations

import subprocess
import sys


def test_api_server_process_imports_no_torch():
    code = ("import sys, vserve.api.server, vserve.api.app, vserve.frontend.engine_client, "
            "vserve.metrics.exposition, vserve.tokenizer; "
            "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]; "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
