#!/usr/bin/env bash
# Lint and validate the Helm chart for the default values and every helm/vserve/ci/*-values.yaml:
#   helm lint --strict, then helm template | kubernetes-validate --strict -k $K8S_VERSION.
# ServiceMonitor (a Prometheus Operator CRD, absent from the Kubernetes schemas) is left out of
# kubernetes-validate; tests/test_helm_chart.py checks it against the operator's field layout.
# The full set of checks (selectors, probes, grace period, security context, schema rejections)
# is tests/test_helm_chart.py, part of `make test`.
# Env: HELM (default .venv/bin/helm, installed by scripts/get-helm.sh), PYTHON, K8S_VERSION.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
HELM=${HELM:-}
if [ -z "$HELM" ]; then scripts/get-helm.sh .venv/bin >/dev/null; HELM=.venv/bin/helm; fi
K8S_VERSION=${K8S_VERSION:-1.29}
chart=helm/vserve
status=0
for values in default "$chart"/ci/*-values.yaml; do
  args=(); [ "$values" = default ] || args=(-f "$values")
  echo "== $values"
  lint=$("$HELM" lint --strict "$chart" "${args[@]}" 2>&1) || { echo "$lint"; status=1; continue; }
  # lint mode reports a template's fail() as "[INFO] Fail:" and still passes.
  if grep -q "Fail:" <<<"$lint"; then echo "$lint"; status=1; continue; fi
  echo "helm lint --strict: ok"
  out=$("$HELM" template vserve "$chart" "${args[@]}" \
        | "$PY" -c 'import sys, yaml
docs = [d for d in yaml.safe_load_all(sys.stdin) if d and d.get("kind") != "ServiceMonitor"]
yaml.safe_dump_all(docs, sys.stdout)' \
        | "$PY" -m kubernetes_validate --strict -k "$K8S_VERSION" - 2>&1) || { echo "$out"; status=1; continue; }
  if grep -qE "WARN|ERROR" <<<"$out"; then echo "$out"; status=1; continue; fi
  echo "kubernetes-validate --strict -k $K8S_VERSION: $(grep -c 'passed for resource' <<<"$out") resources ok"
done
exit $status
