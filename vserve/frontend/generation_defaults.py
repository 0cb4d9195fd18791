"""Sampling defaults from the model's ``generation_config.json`` (``--generation-config``).

A checkpoint's authors often tune temperature, top_p and friends; vLLM applies them to
requests that leave those fields unset, and so does vserve. ``auto`` reads the model
directory's file, a path reads that directory's (or file), ``vserve`` keeps vserve's own
defaults (temperature 1, no top-p/top-k/min-p, no penalty, max_tokens: the room left).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: generation_config.json key → SamplingParams field.
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
          "min_p": "min_p", "repetition_penalty": "repetition_penalty",
          "max_new_tokens": "max_tokens"}


def load_sampling_defaults(model_dir: Path, setting: str) -> dict[str, Any]:
    """The defaults in force: SamplingParams field → value (only those the file sets)."""
    if setting == "vserve":
        return {}
    path = model_dir / "generation_config.json" if setting == "auto" else Path(setting)
    if path.is_dir():
        path = path / "generation_config.json"
    if not path.is_file():
        if setting == "auto":
            return {}
        raise ValueError(f"--generation-config {setting}: no generation_config.json there")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    out: dict[str, Any] = {}
    for key, field in FIELDS.items():
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out[field] = int(value) if field in ("top_k", "max_tokens") else float(value)
    return out


def describe(defaults: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in defaults.items()) or "none"
