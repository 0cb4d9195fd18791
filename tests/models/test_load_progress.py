"""Weight loading says how far it got (periodic lines) and how fast it went."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from vserve.models import loader
from vserve.models.source import resolve_model_dir


def test_progress_lines_and_rate(caplog: pytest.LogCaptureFixture,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real = loader._LoadProgress
    monkeypatch.setattr(loader, "_LoadProgress", lambda files: real(files, interval=0.0))
    with caplog.at_level(logging.INFO, logger="vserve.models.loader"):
        n = sum(1 for _ in loader.iterate_weights(Path(resolve_model_dir("demo"))))
    lines = [r.getMessage() for r in caplog.records]
    progress = [m for m in lines if m.startswith("loading weights: ")]
    assert len(progress) == n  # one per tensor with no interval
    percents = [int(m.split(": ")[1].split("%")[0]) for m in progress]
    assert percents == sorted(percents) and percents[-1] >= 95, percents
    assert any(m.startswith("loaded ") and "GiB/s" in m for m in lines)
