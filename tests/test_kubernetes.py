"""The Kubernetes deployment (deploy/): every overlay rendered offline with ``kubectl kustomize``
and the rendered objects checked field by field with PyYAML.

What is checked is what would otherwise fail only on a real cluster, or silently: GPU requests
and limits, probes on Triton's health endpoints (a startup probe for model loading), the ports,
the initContainer that builds the model repository into the volume the server serves, the
memory-backed /dev/shm of the Python backend, non-root security contexts, resources, Services
and PodDisruptionBudgets that select their pods, the HPA on the queue-time metric that the
prometheus-adapter rule (deploy/monitoring) really produces, and the ServiceMonitor on 8002.

Rendering needs ``kubectl`` with kustomize v5 (no cluster: ``kubectl kustomize`` is offline);
without it these tests are skipped with the reason.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
NAMESPACES = {"gpu": "acestep", "cpu-demo": "acestep-demo"}
TARGETS = {"gpu": "gpu", "cpu-demo": "cpu"}
SERVER_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
FRONTEND_PORT = 7865
CLUSTER_SCOPED = {"Namespace"}
GPU = "nvidia.com/gpu"
MIN_KUSTOMIZE = (5, 0)

Doc = dict[str, Any]


# ------------------------------------------------------------------------------- rendering
def _kustomize_version() -> tuple[int, ...] | None:
    try:
        out = subprocess.run(["kubectl", "version", "--client", "-o", "json"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        version = json.loads(out).get("kustomizeVersion", "")
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return None
    match = re.match(r"v?(\d+)\.(\d+)", version)
    return tuple(int(g) for g in match.groups()) if match else None


def _require_kubectl() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the overlays are rendered with `kubectl kustomize` "
                    "(kustomize v5, kubectl >= 1.27; offline, no cluster needed)")
    version = _kustomize_version()
    if version is None or version < MIN_KUSTOMIZE:
        found = "none" if version is None else ".".join(map(str, version))
        pytest.skip(f"kubectl's kustomize is {found}; the overlays use kustomize v5 syntax "
                    "(labels, patches): install kubectl >= 1.27")


def render(folder: Path) -> list[Doc]:
    result = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {folder} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    _require_kubectl()
    return {name: render(DEPLOY / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def monitoring() -> list[Doc]:
    _require_kubectl()
    return render(DEPLOY / "monitoring")


def find(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(workload: Doc) -> Doc:
    return workload["spec"]["template"]["spec"]


def container(workload: Doc, name: str, init: bool = False) -> Doc:
    key = "initContainers" if init else "containers"
    matches = [c for c in pod_spec(workload).get(key, []) if c["name"] == name]
    assert len(matches) == 1, f"{workload['metadata']['name']}: no {key[:-1]} {name}"
    return matches[0]


def all_containers(workload: Doc) -> list[Doc]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def env(c: Doc) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in {"Deployment", "Job", "StatefulSet", "DaemonSet"}]


# ------------------------------------------------------------------------------- checks (return problems)
def security_problems(workload: Doc) -> list[str]:
    """Non-root pod, and every container without privilege escalation and with no capabilities."""
    name = workload["metadata"]["name"]
    problems = []
    pod = pod_spec(workload).get("securityContext", {})
    if pod.get("runAsNonRoot") is not True:
        problems.append(f"{name}: pod runAsNonRoot is not true")
    if not isinstance(pod.get("runAsUser"), int) or pod["runAsUser"] == 0:
        problems.append(f"{name}: pod runAsUser must be a non-zero uid")
    if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{name}: no RuntimeDefault seccomp profile")
    for c in all_containers(workload):
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}/{c['name']}: allowPrivilegeEscalation is not false")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{name}/{c['name']}: capabilities do not drop ALL")
        if sc.get("privileged") or sc.get("runAsUser") == 0:
            problems.append(f"{name}/{c['name']}: privileged or root")
    return problems


def resource_problems(workload: Doc) -> list[str]:
    """Every container requests CPU and memory and limits memory (no BestEffort pods, no OOM
    surprises); a GPU, where requested, is also the limit (extended resources need both equal)."""
    problems = []
    for c in all_containers(workload):
        where = f"{workload['metadata']['name']}/{c['name']}"
        requests, limits = c.get("resources", {}).get("requests", {}), c.get("resources", {}).get("limits", {})
        for key in ("cpu", "memory"):
            if key not in requests:
                problems.append(f"{where}: no {key} request")
        if "memory" not in limits:
            problems.append(f"{where}: no memory limit")
        if GPU in requests and str(requests[GPU]) != str(limits.get(GPU)):
            problems.append(f"{where}: GPU request and limit differ")
    return problems


def _option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command[:-1] else None


def probe_problems(server: Doc, min_startup_s: int) -> list[str]:
    """Startup on GET /v2/health/ready (HTTP port); liveness and readiness run the image's
    healthcheck.py on /v2/health/live and /v2/health/ready with ``--components live|ready``
    (Triton's endpoints alone stay 200 when a model process died), on the HTTP port's variable;
    the startup probe allows at least ``min_startup_s`` for the models to load."""
    c = container(server, "tritonserver")
    problems = []
    get = c.get("startupProbe", {}).get("httpGet", {})
    if get.get("path") != "/v2/health/ready" or get.get("port") not in ("http", SERVER_PORTS["http"]):
        problems.append(f"startupProbe: {get} is not GET /v2/health/ready on the http port")
    for probe, path, mode in (("livenessProbe", "/v2/health/live", "live"),
                              ("readinessProbe", "/v2/health/ready", "ready")):
        command = c.get(probe, {}).get("exec", {}).get("command", [])
        script = next((a for a in command if a.endswith("healthcheck.py")), None)
        if (script != "/opt/acestep/docker/healthcheck.py" or _option(command, "--path") != path
                or _option(command, "--components") != mode
                or env(c).get(_option(command, "--port-env") or "") != str(SERVER_PORTS["http"])):
            problems.append(f"{probe}: {command} is not healthcheck.py --path {path} --components {mode} "
                            "on the http port's variable")
    startup = c.get("startupProbe", {})
    allowed = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    if allowed < min_startup_s:
        problems.append(f"startupProbe allows {allowed} s for model loading, fewer than {min_startup_s}")
    return problems


def gpu_problems(server: Doc, overlay: str) -> list[str]:
    """The GPU overlay gives the server (and the engine-building initContainer) one GPU each as
    a limit; the CPU demo asks for none."""
    problems = []
    build = container(server, "build-repository", init=True)
    serve = container(server, "tritonserver")
    for c in (build, serve):
        limit = c.get("resources", {}).get("limits", {}).get(GPU)
        if overlay == "gpu" and str(limit) != "1":
            problems.append(f"{c['name']}: {GPU} limit is {limit}, expected 1")
        if overlay != "gpu" and limit is not None:
            problems.append(f"{c['name']}: the CPU demo must not ask for {GPU}")
    return problems


# ------------------------------------------------------------------------------- tests
def test_kubectl_renders_offline_and_there_is_no_helm_chart(rendered: dict[str, list[Doc]]) -> None:
    assert set(OVERLAYS) == set(NAMESPACES), OVERLAYS
    assert not list(DEPLOY.rglob("Chart.yaml")), "no Helm chart: the deployment is kustomize only"
    for overlay, docs in rendered.items():
        kinds = {d["kind"] for d in docs}
        assert {"Namespace", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                "ServiceMonitor"} <= kinds, (overlay, kinds)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lives_in_the_overlay_namespace(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    namespace = NAMESPACES[overlay]
    namespace_doc = one(docs, "Namespace", namespace)
    assert namespace_doc["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in docs:
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == namespace, (doc["kind"], doc["metadata"]["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_ports_and_probes(rendered: dict[str, list[Doc]], overlay: str) -> None:
    server = one(rendered[overlay], "Deployment", "acestep-server")
    ports = {p["name"]: p["containerPort"] for p in container(server, "tritonserver")["ports"]}
    assert ports == SERVER_PORTS
    serve_env = env(container(server, "tritonserver"))
    assert {serve_env[f"ACESTEP_{n.upper()}_PORT"] for n in SERVER_PORTS} == {str(p) for p in SERVER_PORTS.values()}
    assert probe_problems(server, min_startup_s=600 if overlay == "cpu-demo" else 1200) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_prestop_drain_and_stop(rendered: dict[str, list[Doc]], overlay: str) -> None:
    """A rolling update loses nothing only if the kubelet waits for the preStop sleep, `serve`'s
    drain (generations in flight finish) and tritonserver's own stop (issue 19 item 5)."""
    server = one(rendered[overlay], "Deployment", "acestep-server")
    triton = container(server, "tritonserver")
    pre_stop = triton["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(env(triton)["ACESTEP_DRAIN_TIMEOUT_S"])
    assert drain >= 60, "a long generation needs a minute to finish"
    stop_bound = 30  # tritonserver's --exit-timeout-secs, the most its own stop may take
    assert pod_spec(server)["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain + stop_bound


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_init_container_builds_the_repository_the_server_serves(rendered: dict[str, list[Doc]],
                                                                 overlay: str) -> None:
    """Both containers mount one volume at ACESTEP_MODELS_DIR (the repository names its assets
    by absolute path), run the entry point's build and serve modes, for the overlay's target."""
    server = one(rendered[overlay], "Deployment", "acestep-server")
    build = container(server, "build-repository", init=True)
    serve = container(server, "tritonserver")
    assert build["args"] == ["build"] and serve["args"] == ["serve"]
    assert build["image"] == serve["image"]
    modes = set(re.findall(r"^\s*([a-z]+)\)", (ROOT / "docker" / "entrypoint-server.sh").read_text(), re.MULTILINE))
    assert {"build", "serve"} <= modes
    volumes = {v["name"]: v for v in pod_spec(server)["volumes"]}
    for c in (build, serve):
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        models_dir = env(c)["ACESTEP_MODELS_DIR"]
        assert mounts.get(models_dir) == "models", (c["name"], mounts)
        assert env(c)["ACESTEP_TARGET"] == TARGETS[overlay]
    assert "emptyDir" in volumes["models"] or "persistentVolumeClaim" in volumes["models"]


def test_gpu_build_reads_the_checkpoint_pvc_read_only(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["gpu"]
    server = one(docs, "Deployment", "acestep-server")
    build = container(server, "build-repository", init=True)
    mounts = {m["name"]: m for m in build["volumeMounts"]}
    assert mounts["checkpoint"]["readOnly"] is True
    assert env(build)["ACESTEP_CHECKPOINT"] == mounts["checkpoint"]["mountPath"]
    assert int(env(build)["ACESTEP_CHECKPOINT_WAIT_S"]) > 0, "wait for the download Job instead of crash-looping"
    claim = {v["name"]: v for v in pod_spec(server)["volumes"]}["checkpoint"]["persistentVolumeClaim"]
    pvc = one(docs, "PersistentVolumeClaim", claim["claimName"])
    assert "ReadWriteMany" in pvc["spec"]["accessModes"] or "ReadOnlyMany" in pvc["spec"]["accessModes"]
    job = one(docs, "Job", "acestep-checkpoint-download")
    download = container(job, "download")
    assert download["args"] == ["download"]
    job_claims = [v["persistentVolumeClaim"]["claimName"] for v in pod_spec(job)["volumes"]
                  if "persistentVolumeClaim" in v]
    assert job_claims == [claim["claimName"]]
    assert "checkpoint" not in {m["name"] for m in container(server, "tritonserver")["volumeMounts"]}


def test_cpu_demo_builds_the_tiny_checkpoint_and_needs_no_pvc(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["cpu-demo"]
    server = one(docs, "Deployment", "acestep-server")
    assert env(container(server, "build-repository", init=True))["ACESTEP_TINY_CHECKPOINT"] == "1"
    assert not find(docs, "PersistentVolumeClaim") and not find(docs, "Job")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_requests(rendered: dict[str, list[Doc]], overlay: str) -> None:
    server = one(rendered[overlay], "Deployment", "acestep-server")
    assert gpu_problems(server, overlay) == []
    if overlay == "gpu":
        tolerations = pod_spec(server).get("tolerations", [])
        assert any(t.get("key") == GPU for t in tolerations), "GPU nodes are usually tainted"
    for doc in rendered[overlay]:
        if doc["kind"] in {"Deployment", "Job"} and doc["metadata"]["name"] != "acestep-server":
            assert all(GPU not in c.get("resources", {}).get("limits", {}) for c in all_containers(doc))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dev_shm_is_memory_backed(rendered: dict[str, list[Doc]], overlay: str) -> None:
    server = one(rendered[overlay], "Deployment", "acestep-server")
    mounts = {m["mountPath"]: m["name"] for m in container(server, "tritonserver")["volumeMounts"]}
    volume = {v["name"]: v for v in pod_spec(server)["volumes"]}[mounts["/dev/shm"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    size = volume["emptyDir"]["sizeLimit"]
    assert re.fullmatch(r"\d+Gi", size) and int(size[:-2]) >= 1, size


def test_gpu_server_keeps_its_compile_cache_on_a_shared_claim(rendered: dict[str, list[Doc]]) -> None:
    """The DiT's warm-up compiles with TorchInductor before the pod is ready; its kernel caches
    (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR) must be on a volume that outlives the pod (a
    ReadWriteMany claim every server pod mounts), not on /tmp or the per-pod models volume."""
    docs = rendered["gpu"]
    server = one(docs, "Deployment", "acestep-server")
    serve = container(server, "tritonserver")
    mounts = {m["mountPath"]: m for m in serve["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(server)["volumes"]}
    for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        path = Path(env(serve)[variable])
        mount = next((m for p, m in mounts.items() if path.is_relative_to(p)), None)
        assert mount is not None, f"{variable}={path} is on no volume"
        assert not mount.get("readOnly"), f"{variable}: the cache must be writable"
        claim = volumes[mount["name"]].get("persistentVolumeClaim")
        assert claim is not None, f"{variable}: {mount['name']} does not outlive the pod"
        pvc = one(docs, "PersistentVolumeClaim", claim["claimName"])
        assert "ReadWriteMany" in pvc["spec"]["accessModes"], "every server pod shares one cache"
    assert probe_problems(server, min_startup_s=1200) == [], "the startup probe must cover the warm-up"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_non_root_without_privileges(rendered: dict[str, list[Doc]], overlay: str) -> None:
    for workload in workloads(rendered[overlay]):
        assert security_problems(workload) == []
        for c in all_containers(workload):
            assert c["securityContext"].get("readOnlyRootFilesystem") is True, c["name"]
            assert "/tmp" in {m["mountPath"] for m in c.get("volumeMounts", [])}, f"{c['name']}: writable /tmp"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(rendered: dict[str, list[Doc]], overlay: str) -> None:
    for workload in workloads(rendered[overlay]):
        assert resource_problems(workload) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(rendered: dict[str, list[Doc]], overlay: str) -> None:
    for workload in workloads(rendered[overlay]):
        for c in all_containers(workload):
            image = c["image"]
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else None
            assert "@sha256:" in image or (tag and tag != "latest" and re.search(r"\d", tag)), image


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_their_pods_and_name_their_ports(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    for service_name, deployment_name, ports in (("acestep-server", "acestep-server", SERVER_PORTS),
                                                 ("acestep-frontend", "acestep-frontend", {"http": FRONTEND_PORT})):
        service = one(docs, "Service", service_name)
        deployment = one(docs, "Deployment", deployment_name)
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(service["spec"]["selector"], pod_labels)
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
        container_ports = {p["name"]: p["containerPort"] for c in pod_spec(deployment)["containers"]
                           for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert container_ports[port["targetPort"]] == port["port"], port
        assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_frontend_talks_to_the_server_over_grpc(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    frontend = one(docs, "Deployment", "acestep-frontend")
    c = container(frontend, "frontend")
    host, port = env(c)["ACESTEP_URL"].rsplit(":", 1)
    service = one(docs, "Service", host)
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"] == int(port)
    assert env(c)["ACESTEP_FRONTEND_PORT"] == str(FRONTEND_PORT)
    assert env(c).get("ACESTEP_FRONTEND_HOST") == "0.0.0.0"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", FRONTEND_PORT), probe
    assert one(docs, "Service", "acestep-frontend")["spec"].get("sessionAffinity") == "ClientIP"


KEYS_SECRET = "acestep-keys"
SECRET_ENV = {"tritonserver": {"ACESTEP_API_KEY": "api-key", "ACESTEP_ADMIN_KEY": "admin-key"},
              "frontend": {"ACESTEP_API_KEY": "api-key", "ACESTEP_FRONTEND_AUTH": "frontend-auth"}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keys_come_from_an_optional_secret(rendered: dict[str, list[Doc]], overlay: str) -> None:
    """Issue 19: the API key, the admin key and the front end's login come from the Secret
    `acestep-keys`, optional so that a cluster without it runs with the keys off; no manifest
    carries a key's value."""
    docs = rendered[overlay]
    for workload, name in (("acestep-server", "tritonserver"), ("acestep-frontend", "frontend")):
        c = container(one(docs, "Deployment", workload), name)
        refs = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in c.get("env", [])
                if e["name"] in SECRET_ENV[name]}
        assert refs == {k: {"name": KEYS_SECRET, "key": v, "optional": True} for k, v in SECRET_ENV[name].items()}
    assert not find(docs, "Secret"), "key values never live in the manifests"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_only_the_frontend_and_prometheus(rendered: dict[str, list[Doc]],
                                                                overlay: str) -> None:
    docs = rendered[overlay]
    server = one(docs, "Deployment", "acestep-server")
    frontend = one(docs, "Deployment", "acestep-frontend")
    policy = one(docs, "NetworkPolicy", "acestep-server")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], server["spec"]["template"]["metadata"]["labels"])
    assert policy["policyTypes"] == ["Ingress"]
    rules = policy["ingress"]
    assert len(rules) == 2
    by_port = {rule["ports"][0]["port"]: rule["from"] for rule in rules}
    assert set(by_port) == {"grpc", "metrics"}, "only gRPC (front end) and metrics (Prometheus) are reachable"
    (from_frontend,) = by_port["grpc"]
    assert set(from_frontend) == {"podSelector"}, "same namespace only"
    assert selects(from_frontend["podSelector"]["matchLabels"], frontend["spec"]["template"]["metadata"]["labels"])
    (from_prometheus,) = by_port["metrics"]
    assert from_prometheus["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    assert from_prometheus["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    names = {p["name"] for p in container(server, "tritonserver")["ports"]}
    assert {"grpc", "metrics"} <= names, "the policy's named ports exist on the server container"


def _adapter_rules(monitoring: list[Doc]) -> list[Doc]:
    (config_map,) = find(monitoring, "ConfigMap")
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


def test_adapter_rule_turns_triton_counters_into_mean_queue_time(monitoring: list[Doc]) -> None:
    """The rule divides the queue-time counter's rate by the finished-request rate, per pod,
    restricted to the task endpoints: exactly the endpoint names in ensemble_configs/."""
    (rule,) = _adapter_rules(monitoring)
    assert rule["seriesQuery"].startswith("nv_inference_queue_duration_us{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    query = rule["metricsQuery"]
    numerator, denominator = query.split("\n/\n") if "\n/\n" in query else query.split(" / ")
    assert "rate(nv_inference_queue_duration_us{<<.LabelMatchers>>" in numerator
    assert "rate(nv_inference_request_success{<<.LabelMatchers>>" in denominator
    assert "clamp_min(" in denominator, "an idle pod must read 0, not NaN"
    assert query.count("sum by (<<.GroupBy>>)") == 2
    endpoints = {p.stem for p in (ROOT / "ensemble_configs").glob("*.json")}
    for regex in re.findall(r'model=~"([^"]+)"', query):
        assert set(regex.split("|")) == endpoints, (regex, endpoints)
    assert len(re.findall(r'model=~"', query)) == 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_scales_the_server_on_the_adapter_metric(rendered: dict[str, list[Doc]], monitoring: list[Doc],
                                                     overlay: str) -> None:
    docs = rendered[overlay]
    hpa = one(docs, "HorizontalPodAutoscaler", "acestep-server")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["apiVersion"]) == ("Deployment", "apps/v1")
    one(docs, "Deployment", target["name"])
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    names = {r["name"]["as"] for r in _adapter_rules(monitoring)}
    assert metric["pods"]["metric"]["name"] in names
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert float(metric["pods"]["target"]["averageValue"]) > 0
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300, \
        "a server pod is expensive to start: do not flap"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitor_scrapes_the_metrics_port(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    (monitor,) = find(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = one(docs, "Service", "acestep-server")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    port = {p["name"]: p["port"] for p in service["spec"]["ports"]}[endpoint["port"]]
    assert (port, endpoint["path"]) == (SERVER_PORTS["metrics"], "/metrics")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_cover_both_deployments(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    budgets = find(docs, "PodDisruptionBudget")
    for name in ("acestep-server", "acestep-frontend"):
        labels = one(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], labels)]
        assert len(covering) == 1, name
        assert covering[0]["apiVersion"] == "policy/v1"
        assert covering[0]["spec"].get("maxUnavailable") == 1, "minAvailable: 1 would block drains at 1 replica"


def test_checks_catch_broken_manifests(rendered: dict[str, list[Doc]]) -> None:
    """Each check, given the rendered GPU server with one defect, names it."""
    server = one(rendered["gpu"], "Deployment", "acestep-server")
    broken = copy.deepcopy(server)
    serve = container(broken, "tritonserver")
    del serve["resources"]["limits"][GPU]
    serve["securityContext"]["allowPrivilegeEscalation"] = True
    serve["startupProbe"]["failureThreshold"] = 3
    serve["livenessProbe"]["exec"]["command"][3] = "/v2/health/ready"  # the --path value
    del container(broken, "build-repository", init=True)["resources"]["requests"]["memory"]
    pod_spec(broken)["securityContext"]["runAsUser"] = 0
    assert gpu_problems(broken, "gpu") == ["tritonserver: nvidia.com/gpu limit is None, expected 1"]
    assert gpu_problems(server, "cpu-demo")
    assert len(security_problems(broken)) == 2
    assert len(probe_problems(broken, 1200)) == 2
    problems = resource_problems(broken)
    assert any("no memory request" in p for p in problems) and any("GPU request and limit" in p for p in problems)
    assert not selects({}, {"a": "b"}) and not selects({"a": "c"}, {"a": "b"}) and selects({"a": "b"}, {"a": "b"})
