"""The docs name every environment variable vserve reads."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_environment_variable_is_documented() -> None:
    read = set(re.findall(r'"(VSERVE_[A-Z_]+)"', (ROOT / "vserve" / "envs.py").read_text()))
    assert read, "no VSERVE_ variables found in vserve/envs.py"
    documented = set(re.findall(r"`(VSERVE_[A-Z_]+)`",
                                (ROOT / "docs" / "design" / "deployment.md").read_text()))
    assert read <= documented, f"undocumented: {sorted(read - documented)}"
