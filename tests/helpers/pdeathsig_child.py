"""A child for lifetime tests: ``python -m helpers.pdeathsig_child MARKER`` arms vserve's
parent-death handling (PR_SET_PDEATHSIG and the poll), then creates MARKER and waits."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from vserve.launch.lifetime import exit_when_parent_dies

if __name__ == "__main__":
    exit_when_parent_dies()
    Path(sys.argv[1]).touch()
    while True:
        time.sleep(1)
