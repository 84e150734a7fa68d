"""The Helm chart renders (helm template, offline via helm-python-sdk), its manifests validate
against the Kubernetes schemas, and it wires ports, probes, GPUs, secrets and policies right."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.external  # a service binary, the packaged model or a subprocess

helm = pytest.importorskip("helm_python", reason="helm-python-sdk not installed")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy/helm/pagedserve"
KUBE_VERSION = "1.30.0"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
VARIANT = {
    "redis": {"enabled": False},
    "kvstore": {"external": {"existingSecret": "redis-url", "secretKey": "url"}},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
                "prometheusRule": {"enabled": True}},
    "alerts": {"ttftP99SloSeconds": 0.75},
    "model": {"source": "pvc", "path": "/models/smollm2", "pvc": {"claimName": "models"}},
    "router": {"autoscaling": {"enabled": False}, "replicaCount": 3},
    "scheduler": {"workers": ["10.0.0.7:50053"]},
    "worker": {"replicaCount": 4, "gpu": {"count": 2}},
    "networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}]},
}


def render(values: dict[str, Any] | None = None, name: str = "ps") -> list[dict[str, Any]]:
    chart = helm.Chart.load(str(CHART))
    manifests = chart.render(values, name=name, namespace="llm", is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith(".txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                out[c["name"]] = c
    return out


@pytest.fixture(scope="module")
def default_docs() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def variant_docs() -> list[dict[str, Any]]:
    return render(VARIANT)


@pytest.mark.parametrize("variant", ["default", "variant"])
def test_every_manifest_validates_against_kubernetes_schemas(variant, default_docs,
                                                             variant_docs) -> None:
    docs = default_docs if variant == "default" else variant_docs
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "Service", "HorizontalPodAutoscaler" if
            variant == "default" else "Deployment", "NetworkPolicy", "ConfigMap", "Pod"} <= kinds
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert doc["spec"], doc["kind"]
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_default_components_and_names(default_docs) -> None:
    deployments = by_kind(default_docs, "Deployment")
    assert set(deployments) == {"ps-pagedserve-router", "ps-pagedserve-scheduler",
                                "ps-pagedserve-redis"}
    assert set(by_kind(default_docs, "StatefulSet")) == {"ps-pagedserve-worker"}
    assert "ps-pagedserve-router" in by_kind(default_docs, "HorizontalPodAutoscaler")
    assert "replicas" not in deployments["ps-pagedserve-router"]["spec"]  # the HPA owns it
    scheduler = deployments["ps-pagedserve-scheduler"]["spec"]
    assert scheduler["replicas"] == 1 and scheduler["strategy"] == {"type": "Recreate"}
    assert not by_kind(default_docs, "ServiceMonitor") and not by_kind(default_docs,
                                                                       "PrometheusRule")
    for doc in default_docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "ps"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


def test_long_release_names_stay_within_63_characters() -> None:
    for doc in render(name="r" * 60):
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]


def test_containers_use_cli_native_grpc_probes_and_named_metrics_ports(default_docs) -> None:
    cs = containers(default_docs)
    for name in ("router", "scheduler", "worker"):
        c = cs[name]
        assert c["args"][0] == name and c["args"][1:3] == ["--host", "0.0.0.0"]
        port = int(c["args"][c["args"].index("--port") + 1])
        metrics_port = int(c["args"][c["args"].index("--metrics-port") + 1])
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        if name == "router":
            assert ports.pop("http") == 8000  # the OpenAI-compatible API: tested below
        assert ports == {"grpc": port, "metrics": metrics_port}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if (name, probe) != ("router", "readinessProbe"):
                assert c[probe]["grpc"] == {"port": port}, (name, probe)
    for svc in by_kind(default_docs, "Service").values():
        if svc["metadata"]["labels"]["app.kubernetes.io/component"] != "redis":
            assert "metrics" in {p["name"] for p in svc["spec"]["ports"]}


def test_router_serves_the_openai_http_api_with_readiness_on_health(default_docs) -> None:
    router = containers(default_docs)["router"]
    args = router["args"]
    assert args[args.index("--http-port") + 1] == "8000"
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in router["ports"]
    assert router["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert router["readinessProbe"]["periodSeconds"] == 5
    assert router["livenessProbe"]["grpc"] == {"port": 50051}  # the process answers gRPC
    svc = by_kind(default_docs, "Service")["ps-pagedserve-router"]
    assert {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP",
            "appProtocol": "http"} in svc["spec"]["ports"]
    ingress = by_kind(default_docs, "NetworkPolicy")["ps-pagedserve-router"]["spec"]["ingress"]
    assert {"port": 8000, "protocol": "TCP"} in ingress[0]["ports"]

    off = render({"router": {"httpPort": 0}})
    router = containers(off)["router"]
    assert "--http-port" not in router["args"]
    assert "http" not in {p["name"] for p in router["ports"]}
    assert router["readinessProbe"]["grpc"] == {"port": 50051}
    svc = by_kind(off, "Service")["ps-pagedserve-router"]
    assert "http" not in {p["name"] for p in svc["spec"]["ports"]}
    for doc in off:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_grace_periods_exceed_server_grace(default_docs) -> None:
    for doc in default_docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            assert doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30


def test_worker_is_a_gpu_statefulset_behind_a_headless_service(default_docs,
                                                               variant_docs) -> None:
    worker = containers(default_docs)["worker"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"--gpu-memory-utilization", "--swap-space"} <= set(worker["args"])
    assert "--model" not in worker["args"]  # default: the CLI's built-in model
    svc = by_kind(default_docs, "Service")["ps-pagedserve-worker"]
    assert svc["spec"]["clusterIP"] == "None"
    assert by_kind(default_docs, "StatefulSet")["ps-pagedserve-worker"]["spec"][
        "serviceName"] == "ps-pagedserve-worker"
    scheduler = containers(default_docs)["scheduler"]["args"]
    assert scheduler[scheduler.index("--worker-discovery") + 1] == \
        "k8s-headless=ps-pagedserve-worker.llm.svc:50053"
    assert scheduler[scheduler.index("--kvstore") + 1] == "redis://ps-pagedserve-redis:6379/0"
    router = containers(default_docs)["router"]["args"]
    assert router[router.index("--scheduler-address") + 1] == "ps-pagedserve-scheduler:50052"

    worker = containers(variant_docs)["worker"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert worker["args"][worker["args"].index("--model") + 1] == "/models/smollm2"
    sts = by_kind(variant_docs, "StatefulSet")["ps-pagedserve-worker"]["spec"]
    volumes = {v["name"]: v for v in sts["template"]["spec"]["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "models"


def test_external_redis_url_comes_only_from_a_secret_key_ref(variant_docs) -> None:
    assert "ps-pagedserve-redis" not in by_kind(variant_docs, "Deployment")
    scheduler = containers(variant_docs)["scheduler"]
    assert scheduler["args"][scheduler["args"].index("--kvstore") + 1] == \
        "$(PAGEDSERVE_KVSTORE_URL)"
    env = {e["name"]: e for e in scheduler["env"]}
    assert env["PAGEDSERVE_KVSTORE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "redis-url", "key": "url"}
    assert scheduler["args"][scheduler["args"].index("--worker") + 1] == "10.0.0.7:50053"
    assert not by_kind(variant_docs, "Secret")
    for c in containers(variant_docs).values():
        for e in c.get("env", []):
            assert "value" not in e or "redis://" not in e["value"]


def test_network_policies_isolate_components(default_docs, variant_docs) -> None:
    policies = by_kind(default_docs, "NetworkPolicy")

    def sources(component: str) -> list[dict[str, Any]]:
        rules = policies[f"ps-pagedserve-{component}"]["spec"]["ingress"]
        return rules[0]["from"]

    assert sources("router") == [{"namespaceSelector": {}}]
    for component, allowed in (("scheduler", "router"), ("worker", "scheduler"),
                               ("redis", "scheduler")):
        (peer,) = sources(component)
        assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == allowed
    metrics_rule = by_kind(variant_docs, "NetworkPolicy")["ps-pagedserve-worker"]["spec"][
        "ingress"][1]
    assert metrics_rule["ports"] == [{"port": 9402, "protocol": "TCP"}]
    assert metrics_rule["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"}


def test_helm_test_pod_health_checks_the_router(default_docs) -> None:
    (pod,) = by_kind(default_docs, "Pod").values()
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert "-addr=ps-pagedserve-router:50051" in pod["spec"]["containers"][0]["args"]


SECURE = {"tls": {"enabled": True, "secrets": {"worker": "worker-cert"}},
          "router": {"apiKeys": {"existingSecret": "api-keys", "secretKey": "keys.txt"},
                     "rateLimit": {"requestsPerSecond": 5, "tokensPerSecond": 2000,
                                   "tokenBurst": 8000},
                     "prefixCacheIsolation": "api-key"}}


@pytest.fixture(scope="module")
def secure_docs() -> list[dict[str, Any]]:
    return render(SECURE)


def _pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            out[d["spec"]["template"]["spec"]["containers"][0]["name"]] = d["spec"]["template"][
                "spec"]
        elif d["kind"] == "Pod":
            out["test"] = d["spec"]
    return out


def test_secure_values_validate_and_mount_cert_manager_secrets(secure_docs) -> None:
    for doc in secure_docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    specs = _pod_specs(secure_docs)
    secrets = {"router": "ps-pagedserve-router-tls", "scheduler": "ps-pagedserve-scheduler-tls",
               "worker": "worker-cert", "test": "ps-pagedserve-router-tls"}
    for name, secret in secrets.items():
        volumes = {v["name"]: v for v in specs[name]["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == secret, name
        (container,) = specs[name]["containers"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["tls"] == "/etc/pagedserve/tls", name
        args = " ".join(container["args"])
        for key in ("tls.crt", "tls.key", "ca.crt"):  # cert-manager's Secret keys
            assert f"/etc/pagedserve/tls/{key}" in args, (name, key)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if name != "test":  # the kubelet's probes carry no client certificate
                assert set(container[probe]) & {"grpc", "httpGet", "tcpSocket"} == {
                    "tcpSocket"}, (name, probe)
    keys = {v["name"]: v for v in specs["router"]["volumes"]}["api-keys"]["secret"]
    assert keys["secretName"] == "api-keys" and keys["items"] == [
        {"key": "keys.txt", "path": "api-keys"}]
    assert "-tls-server-name=ps-pagedserve-router" in specs["test"]["containers"][0]["args"]


def _parse(container: dict[str, Any]) -> Any:
    """The container's command line through the service's real parser: its config."""
    import argparse

    from pagedserve.core.logs import add_logging_arguments
    from router.config import add_router_arguments, router_config_from_args
    from scheduler.config import add_scheduler_arguments, scheduler_config_from_args
    from worker.config import add_worker_arguments, worker_config_from_args

    service, *argv = container["args"]
    add, build = {"router": (add_router_arguments, router_config_from_args),
                  "scheduler": (add_scheduler_arguments, scheduler_config_from_args),
                  "worker": (add_worker_arguments, worker_config_from_args)}[service]
    parser = argparse.ArgumentParser(exit_on_error=False)
    add(parser)
    add_logging_arguments(parser)  # as each service's __main__ adds them
    args = parser.parse_args(argv)
    assert args.log_format in ("text", "json")
    return build(args)


def test_rendered_commands_parse_with_the_real_cli(default_docs, secure_docs) -> None:
    from router.cache_salt import CacheIsolation

    plain = {name: _parse(c) for name, c in containers(default_docs).items() if name != "redis"}
    assert not plain["router"].server.tls.enabled and not plain["worker"].server.tls.enabled
    assert plain["router"].api_key_file is None and not plain["router"].rate_limits.enabled
    assert plain["router"].prefix_cache_isolation is CacheIsolation.NONE
    cfg = {name: _parse(c) for name, c in containers(secure_docs).items() if name != "redis"}
    tls_dir = "/etc/pagedserve/tls"
    for name in ("router", "scheduler", "worker"):
        tls = cfg[name].server.tls
        assert (tls.cert_file, tls.key_file, tls.ca_file) == (
            f"{tls_dir}/tls.crt", f"{tls_dir}/tls.key", f"{tls_dir}/ca.crt"), name
        assert tls.mutual
    assert cfg["worker"].server.client_identities == ("ps-pagedserve-scheduler",)
    assert cfg["scheduler"].server.client_identities == ("ps-pagedserve-router",)
    assert cfg["scheduler"].server.worker_tls.server_name == "ps-pagedserve-worker"
    router = cfg["router"]
    assert router.api_key_file == "/etc/pagedserve/api-keys/api-keys"
    limits = router.rate_limits
    assert (limits.requests_per_s, limits.request_burst, limits.tokens_per_s,
            limits.token_burst) == (5, None, 2000, 8000)
    assert router.prefix_cache_isolation is CacheIsolation.API_KEY


def test_prefix_cache_isolation_by_api_key_without_keys_fails_to_render() -> None:
    with pytest.raises(helm.HelmRenderError, match="needs router.apiKeys.existingSecret"):
        render({"router": {"prefixCacheIsolation": "api-key"}})


def test_dashboard_configmap_ships_the_dashboard(default_docs) -> None:
    cm = by_kind(default_docs, "ConfigMap")["ps-pagedserve-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(cm["data"]["pagedserve.json"])
    assert shipped == json.loads((ROOT / "deploy/grafana/pagedserve.json").read_text())


def test_servicemonitor_scrapes_metrics_ports_with_job_names(variant_docs) -> None:
    (sm,) = by_kind(variant_docs, "ServiceMonitor").values()
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert sm["spec"]["jobLabel"] == "pagedserve.io/job"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    jobs = {s["metadata"]["labels"].get("pagedserve.io/job")
            for s in by_kind(variant_docs, "Service").values()}
    assert {"pagedserve-router", "pagedserve-scheduler", "pagedserve-worker"} <= jobs


def test_alerts_file_is_the_chart_rule_with_default_values() -> None:
    docs = render({"metrics": {"prometheusRule": {"enabled": True}}})
    (rule,) = by_kind(docs, "PrometheusRule").values()
    assert rule["spec"] == yaml.safe_load((ROOT / "deploy/prometheus/alerts.yaml").read_text())


def test_ttft_slo_is_configurable(variant_docs) -> None:
    (rule,) = by_kind(variant_docs, "PrometheusRule").values()
    exprs = {r["alert"]: r["expr"] for r in rule["spec"]["groups"][0]["rules"]}
    assert exprs["PagedserveTTFTSLOBreached"].endswith("> 0.75")


@pytest.mark.parametrize("bad", [
    {"worker": {"gpu": {"count": -1}}},
    {"router": {"port": "grpc"}},
    {"router": {"prot": 50051}},
    {"router": {"httpPort": "http"}},
    {"router": {"httpPort": 70000}},
    {"scheduler": {"replicaCount": 2}},
    {"model": {"source": "pvc"}},
    {"kvstore": {"backend": "etcd"}},
    {"alerts": {"kvUsageThreshold": 95}},
    {"worker": {"gpuMemoryUtilization": 1.5}},
    {"worker": {"tensorParallelSize": 0}},
    {"worker": {"tensorParallelPort": 0}},
    {"worker": {"tensorParallelTimeoutSeconds": 0}},
    {"tls": {"enabled": "yes"}},
    {"tls": {"secrets": {"redis": "x"}}},
    {"router": {"rateLimit": {"requestsPerSecond": -1}}},
    {"router": {"rateLimit": {"tokenBurst": 0}}},
    {"router": {"apiKeys": {"existingSecret": "keys", "secretKey": ""}}},
    {"router": {"prefixCacheIsolation": "tenant"}},
    {"logFormat": "xml"},
])
def test_schema_rejects_bad_values(bad) -> None:
    with pytest.raises(helm.HelmValuesError):
        render(bad)


def test_log_format_reaches_every_service() -> None:
    json_logs = containers(render({"logFormat": "json"}))
    for name in ("router", "scheduler", "worker"):
        assert _parse(json_logs[name]) is not None
        args = json_logs[name]["args"]
        assert args[args.index("--log-format") + 1] == "json", name


# ------------------------------------------- tensor parallelism (worker.tensorParallelSize)

TP = {"worker": {"replicaCount": 2, "tensorParallelSize": 2}}
POD_INDEX = "metadata.labels['apps.kubernetes.io/pod-index']"


@pytest.fixture(scope="module")
def tp_docs() -> list[dict[str, Any]]:
    return render(TP)


def _validate(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_tensor_parallel_groups_validate_against_kubernetes_schemas(tp_docs) -> None:
    _validate(tp_docs)
    _validate(render({**SECURE, **TP, "model": VARIANT["model"]}))


def test_each_group_is_a_statefulset_of_ranks_with_stable_names(tp_docs) -> None:
    sets = by_kind(tp_docs, "StatefulSet")
    assert set(sets) == {"ps-pagedserve-worker-0", "ps-pagedserve-worker-1"}
    worker_selector = {"app.kubernetes.io/name": "pagedserve", "app.kubernetes.io/instance": "ps",
                       "app.kubernetes.io/component": "worker"}
    for g in range(2):
        spec = sets[f"ps-pagedserve-worker-{g}"]["spec"]
        # N pods started together: OrderedReady would wait for pod 0, which waits for the rest.
        assert spec["replicas"] == 2 and spec["podManagementPolicy"] == "Parallel"
        assert spec["serviceName"] == "ps-pagedserve-worker-ranks"
        selector = spec["selector"]["matchLabels"]
        assert selector == {**worker_selector, "pagedserve.io/worker-group": str(g)}
        assert selector.items() <= spec["template"]["metadata"]["labels"].items()
        (container,) = spec["template"]["spec"]["containers"]
        assert {"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"} in \
            container["ports"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1  # per rank
    ranks = by_kind(tp_docs, "Service")["ps-pagedserve-worker-ranks"]
    assert ranks["spec"]["clusterIP"] == "None"
    assert ranks["spec"]["publishNotReadyAddresses"] is True  # ranks meet before they serve
    assert ranks["spec"]["selector"] == worker_selector  # every rank of every group
    assert {"name": "rendezvous", "port": 29500, "targetPort": "rendezvous",
            "protocol": "TCP"} in ranks["spec"]["ports"]


def test_scheduler_discovers_group_leaders_not_ranks(tp_docs) -> None:
    services = by_kind(tp_docs, "Service")
    discovery = services["ps-pagedserve-worker"]
    assert discovery["spec"]["clusterIP"] == "None"
    assert discovery["spec"]["selector"]["apps.kubernetes.io/pod-index"] == "0"
    assert not discovery["spec"].get("publishNotReadyAddresses")  # a leader once it serves
    scheduler = containers(tp_docs)["scheduler"]["args"]
    assert scheduler[scheduler.index("--worker-discovery") + 1] == \
        "k8s-headless=ps-pagedserve-worker.llm.svc:50053"
    # Metrics of every rank, scraped once: through the ranks' Service, not the leaders'.
    assert "pagedserve.io/metrics" not in discovery["metadata"]["labels"]
    assert services["ps-pagedserve-worker-ranks"]["metadata"]["labels"][
        "pagedserve.io/job"] == "pagedserve-worker"


def _run_worker_cli(container: dict[str, Any], env: dict[str, str],
                    monkeypatch: pytest.MonkeyPatch) -> Any:
    """The container's command as its entrypoint runs it (``pagedserve worker ...`` through
    ``pagedserve.cli.main``), with the pod's environment; the config it would serve."""
    import worker.__main__
    from pagedserve.cli import main

    served = []

    async def serve(config: Any) -> int:
        served.append(config)
        return 0

    monkeypatch.setattr(worker.__main__, "serve", serve)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        code = main(container["args"])
    except SystemExit as exc:  # the worker's exit status is its server's (0 once it stopped)
        code = exc.code
    assert code == 0 and len(served) == 1
    return served[0]


def _pod_env(container: dict[str, Any], pod_labels: dict[str, str]) -> dict[str, str]:
    """What the kubelet puts in the container's environment from the downward API."""
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e.get("valueFrom", {}):
            path = e["valueFrom"]["fieldRef"]["fieldPath"]
            assert path.startswith("metadata.labels['"), path
            env[e["name"]] = pod_labels[path[len("metadata.labels['"):-2]]
    return env


@pytest.mark.parametrize("values", [TP, {**TP, **SECURE}], ids=["plain", "secure"])
def test_every_rank_command_parses_with_the_real_cli(values, monkeypatch) -> None:
    """Each pod of each group, as the StatefulSet controller makes it (name ``<set>-<ordinal>``,
    ``apps.kubernetes.io/pod-index`` = ordinal), runs a worker of rank = ordinal whose
    rendezvous is pod 0 of its own group by its stable DNS name."""
    from worker.config import ParallelConfig

    docs = render(values)
    for name, sts in by_kind(docs, "StatefulSet").items():
        spec = sts["spec"]
        (container,) = spec["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["PAGEDSERVE_WORKER_TENSOR_PARALLEL_RANK"]["valueFrom"]["fieldRef"][
            "fieldPath"] == POD_INDEX
        pod0 = f"{name}-0.{spec['serviceName']}.llm.svc"
        for ordinal in range(spec["replicas"]):
            labels = {**spec["template"]["metadata"]["labels"],
                      "apps.kubernetes.io/pod-index": str(ordinal)}
            config = _run_worker_cli(container, _pod_env(container, labels), monkeypatch)
            assert config.parallel == ParallelConfig(2, ordinal, f"{pod0}:29500", 30.0)
            assert config.server.worker_id == name and config.server.port == 50053
            assert config.server.tls.enabled == ("tls" in values)
    cfg = {n: _parse(c) for n, c in containers(docs).items() if n in ("router", "scheduler")}
    assert cfg["scheduler"].worker_discovery == "k8s-headless=ps-pagedserve-worker.llm.svc:50053"


def test_ranks_of_a_group_reach_each_other_on_any_port(tp_docs) -> None:
    policies = by_kind(tp_docs, "NetworkPolicy")
    for g in range(2):
        spec = policies[f"ps-pagedserve-worker-{g}"]["spec"]
        group = spec["podSelector"]["matchLabels"]
        assert group["pagedserve.io/worker-group"] == str(g)
        (rule,) = spec["ingress"]
        assert rule["from"] == [{"podSelector": {"matchLabels": group}}]
        assert "ports" not in rule  # gloo and NCCL pick ports at run time
    # The scheduler still reaches only the gRPC port.
    (peer,) = policies["ps-pagedserve-worker"]["spec"]["ingress"][0]["from"]
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "scheduler"


def test_long_release_names_keep_rank_pod_names_valid() -> None:
    for sts in by_kind(render(TP, name="r" * 60), "StatefulSet").values():
        name = sts["metadata"]["name"]
        # Pods are <name>-<ordinal>; the controller's revision label is <name>-<10-char hash>.
        assert len(name) <= 52 and name.endswith(("-worker-0", "-worker-1")), name


def test_tensor_parallel_size_one_renders_as_before(default_docs) -> None:
    assert render({"worker": {"tensorParallelSize": 1}}) == default_docs
    assert "ps-pagedserve-worker-ranks" not in by_kind(default_docs, "Service")
    worker = containers(default_docs)["worker"]
    assert not any(a.startswith("--tensor-parallel") for a in worker["args"])


@pytest.mark.parametrize("values", [None, TP], ids=["default", "tensor-parallel"])
def test_helm_lint_reports_no_errors(values) -> None:
    report = helm.lint(str(CHART), values, strict=False, kube_version="v1.30.0")
    errors = [m for m in report["messages"] if m["severity"] >= 3]
    assert not errors and not report.get("errors"), report
