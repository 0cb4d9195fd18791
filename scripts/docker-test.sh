#!/usr/bin/env bash
# Build the CPU image, run `vserve serve demo --api-server-count 2` in it the way Kubernetes
# runs it (read-only root filesystem, tmpfs /tmp and home, no capabilities, non-root), check
# /health, /ready, /v1/models and a completion, then stop it with SIGTERM and expect exit 0.
#
# Needs a running Docker engine; without one it prints SKIP and exits 0 (exit 1 instead when
# DOCKER_TEST_REQUIRED=1). Host networking only (`--network host`), so it also works on
# engines started without a bridge network.
#
# Where torch comes from (the image defaults to https://download.pytorch.org/whl/cpu):
#   1. TORCH_INDEX_URL / TORCH_FIND_LINKS from the environment, when set;
#   2. else the image default, when download.pytorch.org answers;
#   3. else a local torch==$TORCH_VERSION+cpu wheel that this machine's pip can find (its
#      find-links / extra index), served to the build over http://127.0.0.1, with PyPI for
#      torch's own dependencies;
#   4. else PyPI's torch (the large CUDA build; it works on CPU too).
# Env: IMAGE (vserve:docker-test), PORT (18000), WHEEL_PORT (18999), TORCH_VERSION (2.13.0), KEEP_IMAGE=1,
#      READY_TIMEOUT seconds (300), PYTHON (the interpreter whose pip finds wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-vserve:docker-test}
PORT=${PORT:-18000}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
READY_TIMEOUT=${READY_TIMEOUT:-300}
CPU_BASE_IMAGE=${CPU_BASE_IMAGE:-python:3.11-slim}
NAME=vserve-docker-test-$$
PY=${PYTHON:-}
[ -n "$PY" ] || { [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; }

say() { printf '[docker-test] %s\n' "$*"; }
skip() {
  say "SKIP: $*"
  if [ "${DOCKER_TEST_REQUIRED:-0}" = 1 ]; then exit 1; fi
  exit 0
}
command -v docker >/dev/null 2>&1 || skip "no docker CLI on PATH; install Docker and re-run"
docker info >/dev/null 2>&1 || skip "no Docker engine is running (docker info failed); start one and re-run"

tmp=$(mktemp -d)
server_pid=
cleanup() {
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  rm -rf "$tmp"
  if [ "${KEEP_IMAGE:-0}" != 1 ]; then docker rmi "$IMAGE" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

reachable() { "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=8)' "$1" >/dev/null 2>&1; }

build_args=(--build-arg VARIANT=cpu --build-arg "CPU_BASE_IMAGE=$CPU_BASE_IMAGE" --build-arg "TORCH_VERSION=$TORCH_VERSION")
if [ -n "${TORCH_INDEX_URL:-}${TORCH_FIND_LINKS:-}" ]; then
  say "torch: from TORCH_INDEX_URL='${TORCH_INDEX_URL:-}' TORCH_FIND_LINKS='${TORCH_FIND_LINKS:-}' (set by you)"
  build_args+=(--build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}" --build-arg "TORCH_FIND_LINKS=${TORCH_FIND_LINKS:-}")
elif reachable https://download.pytorch.org/whl/cpu/torch/; then
  say "torch: the image default, https://download.pytorch.org/whl/cpu (reachable)"
else
  say "torch: download.pytorch.org is unreachable from here"
  mkdir -p "$tmp/wheels"
  if "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
        --platform manylinux_2_28_x86_64 -d "$tmp/wheels" "torch==${TORCH_VERSION}+cpu" >"$tmp/pip.log" 2>&1; then
    # A fixed port when free: the URL is a build argument, and a new one would miss the cache.
    port=$("$PY" -c 'import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' "${WHEEL_PORT:-18999}")
    "$PY" -m http.server --bind 127.0.0.1 --directory "$tmp/wheels" "$port" >"$tmp/http.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 50); do reachable "http://127.0.0.1:$port/" && break; sleep 0.1; done
    say "torch: local wheel $(ls "$tmp/wheels") served at http://127.0.0.1:$port/ (TORCH_FIND_LINKS), other packages from PyPI"
    build_args+=(--build-arg "TORCH_INDEX_URL=https://pypi.org/simple" --build-arg "TORCH_FIND_LINKS=http://127.0.0.1:$port/")
  else
    say "torch: no local torch==${TORCH_VERSION}+cpu wheel; using PyPI's torch (the large CUDA build)"
    build_args+=(--build-arg "TORCH_INDEX_URL=https://pypi.org/simple")
  fi
fi
if ! docker buildx version >/dev/null 2>&1; then
  # The legacy builder builds every stage, the CUDA base's too; point it at the CPU base.
  say "legacy builder (no buildx): CUDA_BASE_IMAGE=$CPU_BASE_IMAGE for this CPU build"
  build_args+=(--build-arg "CUDA_BASE_IMAGE=$CPU_BASE_IMAGE")
fi

say "building $IMAGE"
start=$(date +%s)
DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0} docker build --network host -q "${build_args[@]}" -t "$IMAGE" . >"$tmp/build.log" 2>&1 || {
  cat "$tmp/build.log"; say "FAIL: docker build"; exit 1; }
say "built in $(( $(date +%s) - start ))s: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')," \
    "user $(docker image inspect -f '{{.Config.User}}' "$IMAGE"), entrypoint $(docker image inspect -f '{{json .Config.Entrypoint}}' "$IMAGE")"

say "running: vserve serve demo --api-server-count 2 --host 127.0.0.1 --port $PORT (read-only rootfs)"
docker run -d --name "$NAME" --network host --read-only \
  --tmpfs /tmp:rw,mode=1777 --tmpfs /home/vserve:rw,uid=10001,gid=10001,mode=0700 \
  --shm-size 1g --cap-drop ALL --security-opt no-new-privileges \
  -e VSERVE_HEALTHCHECK_URL="http://127.0.0.1:$PORT/health" \
  "$IMAGE" demo --host 127.0.0.1 --port "$PORT" --api-server-count 2 --shutdown-timeout 10 >/dev/null

fail() { say "FAIL: $*"; docker logs "$NAME" 2>&1 | tail -50; exit 1; }
start=$(date +%s)
until reachable "http://127.0.0.1:$PORT/ready"; do
  [ "$(docker inspect -f '{{.State.Running}}' "$NAME")" = true ] || fail "the container exited"
  [ $(( $(date +%s) - start )) -lt "$READY_TIMEOUT" ] || fail "not ready after ${READY_TIMEOUT}s"
  sleep 1
done
say "ready after $(( $(date +%s) - start ))s"

"$PY" - "$PORT" <<'PYCHECK' || fail "HTTP checks"
import json, sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
def get(path):
    with urllib.request.urlopen(base + path, timeout=30) as r:
        return r.status, dict(r.headers), r.read()
status, _, _ = get("/health")
assert status == 200, status
status, _, body = get("/v1/models")
models = json.loads(body)
ids = [m["id"] for m in models["data"]]
assert status == 200 and ids, models
print(f"[docker-test] GET /v1/models -> {status} {ids}")
servers = set()
for _ in range(8):
    req = urllib.request.Request(
        base + "/v1/completions", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"model": ids[0], "prompt": "The quick brown fox", "max_tokens": 8,
                         "temperature": 0}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        out = json.loads(r.read())
        servers.add(r.headers.get("x-vserve-api-server"))
    assert r.status == 200 and isinstance(out["choices"][0]["text"], str), out
    assert out["usage"]["completion_tokens"] > 0, out
print(f"[docker-test] POST /v1/completions -> 200 {out['choices'][0]['text']!r} "
      f"usage={out['usage']} (answered by API servers {sorted(s for s in servers if s)})")
PYCHECK
say "uid in the container: $(docker exec "$NAME" id -u); docker health: $(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$NAME")"

start=$(date +%s)
docker stop -t 30 "$NAME" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
[ "$code" = 0 ] || fail "exit code $code after SIGTERM (expected 0: drained)"
say "SIGTERM: drained and exited 0 in $(( $(date +%s) - start ))s"
say "PASS"
