"""The Kubernetes manifests (deploy/kubernetes), checked without a cluster: every overlay
renders with kustomize and its core objects pass the API's schema (strict); and what breaks
silently holds: selectors find the pods they are meant for, probes hit routes the servers
serve, autoscalers read metrics that exist, the gateway's config passes its startup
validation and names headless Services whose pods serve its models, GPUs match the tensor
parallelism, nothing runs as root, and a stopping pod outlasts its drain."""

from __future__ import annotations

import base64
import os
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from app.gpu import NvmlCollector
from app.main import create_app
from app.metrics import Metrics
from app.settings import CONFIG_ENV, DEFAULT_MODEL_NAME, Settings, VariantSettings
from tests.live_server import required_binary

ROOT = Path(__file__).parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.parent.name for p in (KUBERNETES / "overlays").glob("*/kustomization.yaml"))
# The oldest release the manifests are for (vLLM's preStop `sleep` action needs 1.30).
KUBERNETES_VERSION = "1.32"
# How long a DNS answer about a Service lives (the default of CoreDNS's kubernetes plugin).
DNS_TTL_S = 5
OUR_IMAGES = {"model-gateway", "model-gateway-prepare"}  # the names `images:` overrides
VLLM_IMAGE = "vllm/vllm-openai"
CUSTOM_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "ScaledObject": "keda.sh/v1alpha1",
}

Manifest = dict[str, Any]


class Rendered:
    """One overlay as `kubectl kustomize` renders it."""

    def __init__(self, overlay: str, objects: list[Manifest]) -> None:
        self.overlay = overlay
        self.objects = objects

    def of_kind(self, kind: str) -> list[Manifest]:
        return [o for o in self.objects if o["kind"] == kind]

    def named(self, kind: str, name: str) -> Manifest:
        (found,) = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        return found

    def workloads(self) -> dict[str, Manifest]:
        """Deployments and StatefulSets by name."""
        kinds = ("Deployment", "StatefulSet")
        return {o["metadata"]["name"]: o for o in self.objects if o["kind"] in kinds}

    def selected(self, selector: dict[str, Any]) -> set[str]:
        """The workloads whose pods a selector picks."""
        return {name for name, w in self.workloads().items() if selects(selector, pod_labels(w))}


def render(overlay: str) -> Rendered:
    kubectl = required_binary("kubectl", "kubectl 1.32 or later, which carries kustomize")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES / "overlays" / overlay)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return Rendered(overlay, [o for o in yaml.safe_load_all(result.stdout) if o])


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return render(request.param)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Service's selector (a map) or a LabelSelector; an empty one (all pods) never counts."""
    assert "matchExpressions" not in selector, "selects() knows matchLabels only"
    wanted: dict[str, str] = selector.get("matchLabels", selector)
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def pod_labels(workload: Manifest) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def pod_spec(workload: Manifest) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Manifest) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def main_container(workload: Manifest) -> dict[str, Any]:
    (container,) = pod_spec(workload)["containers"]
    return container


def image_name(container: dict[str, Any]) -> str:
    return str(container["image"]).rsplit(":", 1)[0]


def port_names(workload: Manifest) -> set[str]:
    return {p["name"] for c in containers(workload) for p in c.get("ports", [])}


def flags(container: dict[str, Any]) -> dict[str, str]:
    """The container's `--flag=value` arguments."""
    pairs = [a.removeprefix("--").split("=", 1) for a in container.get("args", []) if "=" in a]
    return dict(pairs)


def prestop_sleep_s(container: dict[str, Any]) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0.0
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert Path(command[0]).name == "sleep", command
    return float(command[1])


def serves(container: dict[str, Any]) -> bool:
    """One of our servers (rather than the model's preparation)."""
    command = container.get("command")
    return image_name(container) in OUR_IMAGES and command == ["model-gateway", "serve"]


def container_settings(
    rendered: Rendered, workload: Manifest, container: dict[str, Any], tmp_path: Path
) -> Settings:
    """The settings the container starts with: the config file mounted from a ConfigMap where
    MODEL_GATEWAY_CONFIG says, under the container's MODEL_GATEWAY_* environment (its Secrets'
    too)."""
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    for source in container.get("envFrom", []):
        secret = rendered.named("Secret", source["secretRef"]["name"])
        env |= {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    config_path = Path(env.pop(CONFIG_ENV))
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    (volume,) = [v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"]]
    config_map = rendered.named("ConfigMap", volume["configMap"]["name"])
    config_file = tmp_path / f"{workload['metadata']['name']}-{container['name']}.yaml"
    config_file.write_text(config_map["data"][config_path.name])
    with pytest.MonkeyPatch.context() as patch:
        for variable in os.environ:
            if variable.startswith("MODEL_GATEWAY_"):
                patch.delenv(variable)
        for name, value in env.items():
            if name.startswith("MODEL_GATEWAY_"):
                patch.setenv(name, value)
        patch.setenv(CONFIG_ENV, str(config_file))
        return Settings()


def configured(rendered: Rendered, tmp_path: Path) -> list[tuple[str, dict[str, Any], Settings]]:
    """(workload, container, its settings) for every container of ours given a config."""
    return [
        (name, container, container_settings(rendered, workload, container, tmp_path))
        for name, workload in rendered.workloads().items()
        for container in containers(workload)
        if any(e["name"] == CONFIG_ENV for e in container.get("env", []))
    ]


def gateway_settings(rendered: Rendered, tmp_path: Path) -> Settings:
    (settings,) = [s for name, _, s in configured(rendered, tmp_path) if name == "gateway"]
    return settings


def exported_series() -> set[str]:
    """Every series name the app's /metrics can carry."""
    metrics = Metrics()
    metrics.registry.register(NvmlCollector(None, []))
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {
        family.name + suffix
        for family in metrics.registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def metric_names(promql: str) -> set[str]:
    """The model-gateway and vLLM series a PromQL expression (or series query) names."""
    return set(re.findall(r"\b(?:model_gateway_\w+|vllm:\w+)", promql))


def matchers(promql: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', promql))


def monitor_jobs(rendered: Rendered, workload: str) -> set[str]:
    """The job labels the ServiceMonitors of a workload's pods give their series."""
    return {
        relabel["replacement"]
        for monitor in rendered.of_kind("ServiceMonitor")
        if rendered.selected(
            rendered.named("Service", monitor["metadata"]["name"])["spec"]["selector"]
        )
        == {workload}
        for endpoint in monitor["spec"]["endpoints"]
        for relabel in endpoint.get("relabelings", [])
        if relabel["targetLabel"] == "job"
    }


def adapter_metrics() -> dict[str, str]:
    """The custom metrics that prometheus-adapter serves with our values: name -> series."""
    path = KUBERNETES / "components" / "hpa" / "prometheus-adapter-values.yaml"
    served = {}
    for rule in yaml.safe_load(path.read_text())["rules"]["custom"]:
        (series,) = metric_names(rule["seriesQuery"])
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}, series
        naming = rule.get("name", {"matches": "^(.*)$", "as": "${1}"})
        as_python = re.sub(r"\$\{?(\d+)\}?", r"\\\1", naming["as"])
        served[re.sub(naming["matches"], as_python, series)] = series
    return served


def test_the_overlays_are_each_stack_with_each_autoscaler() -> None:
    assert OVERLAYS == ["cpu", "cpu-keda", "gpu", "gpu-keda"]


def test_every_overlay_renders_the_whole_stack_in_one_namespace(rendered: Rendered) -> None:
    gpu = {"vllm"} if rendered.overlay.startswith("gpu") else set()
    assert set(rendered.workloads()) == {"gateway", "worker-ct2", "redis"} | gpu
    (namespace,) = rendered.of_kind("Namespace")
    for manifest in rendered.objects:
        if manifest is not namespace:
            assert manifest["metadata"]["namespace"] == namespace["metadata"]["name"], manifest


def test_core_objects_pass_the_api_schema_and_custom_ones_are_known(rendered: Rendered) -> None:
    for manifest in rendered.objects:
        where = f"{rendered.overlay}: {manifest['kind']}/{manifest['metadata']['name']}"
        if manifest["kind"] in CUSTOM_KINDS:
            assert manifest["apiVersion"] == CUSTOM_KINDS[manifest["kind"]], where
            continue
        try:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{where}: {error.message} at {list(error.path)}")


def test_what_pods_mount_and_read_exists(rendered: Rendered) -> None:
    """Volume mounts name the pod's volumes; ConfigMaps and Secrets named are in the render,
    but for a Secret marked optional (made by hand, such as vLLM's token)."""
    made = {
        kind: {o["metadata"]["name"] for o in rendered.of_kind(kind)}
        for kind in ("ConfigMap", "Secret")
    }
    for name, workload in rendered.workloads().items():
        volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
        claims = [c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])]
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in made["ConfigMap"], name
        for container in containers(workload):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in [*volumes, *claims], (name, mount)
            for source in container.get("envFrom", []):
                assert source["secretRef"]["name"] in made["Secret"], name
            for variable in container.get("env", []):
                secret = variable.get("valueFrom", {}).get("secretKeyRef")
                if secret is not None and not secret.get("optional"):
                    assert secret["name"] in made["Secret"], (name, variable["name"])


def test_selectors_find_the_pods_they_are_meant_for(rendered: Rendered) -> None:
    """Disruption budgets, network policies and spread constraints pick the pods of the
    workload they are named after, Services those of at least one; the ports they name are
    the pods'."""
    workloads = rendered.workloads()
    for name, workload in workloads.items():
        assert rendered.selected(workload["spec"]["selector"]) == {name}
        for constraint in pod_spec(workload).get("topologySpreadConstraints", []):
            assert rendered.selected(constraint["labelSelector"]) == {name}
    for service in rendered.of_kind("Service"):
        picked = rendered.selected(service["spec"]["selector"])
        assert picked, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            for workload in picked:
                assert port["targetPort"] in port_names(workloads[workload]), (workload, port)
    for budget in rendered.of_kind("PodDisruptionBudget"):
        assert rendered.selected(budget["spec"]["selector"]) == {budget["metadata"]["name"]}
    for policy in rendered.of_kind("NetworkPolicy"):
        name = policy["metadata"]["name"]
        assert rendered.selected(policy["spec"]["podSelector"]) == {name}
        for rule in policy["spec"]["ingress"]:
            assert {p["port"] for p in rule["ports"]} <= port_names(workloads[name]), name
            for peer in rule["from"]:
                if "namespaceSelector" not in peer:
                    assert rendered.selected(peer["podSelector"]), (name, peer)


def test_the_backends_let_in_only_the_gateways_and_prometheus(rendered: Rendered) -> None:
    """The workers and vLLM take no keys, Redis no password: a NetworkPolicy admits the
    gateway pods only (and Prometheus pods, from any namespace, to the servers' /metrics)."""
    prometheus = {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    for name in set(rendered.workloads()) - {"gateway"}:
        (rule,) = rendered.named("NetworkPolicy", name)["spec"]["ingress"]
        local = [p for p in rule["from"] if "namespaceSelector" not in p]
        assert [rendered.selected(p["podSelector"]) for p in local] == [{"gateway"}], name
        remote = [p["podSelector"] for p in rule["from"] if "namespaceSelector" in p]
        assert remote == ([] if name == "redis" else [prometheus]), name


def test_monitors_scrape_every_server_on_its_metrics_route(rendered: Rendered) -> None:
    monitored = set()
    for monitor in rendered.of_kind("ServiceMonitor"):
        name = monitor["metadata"]["name"]
        selector = monitor["spec"]["selector"]
        services = rendered.of_kind("Service")
        picked = [
            s["metadata"]["name"] for s in services if selects(selector, s["metadata"]["labels"])
        ]
        assert picked == [name]
        service = rendered.named("Service", name)
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}, name
            assert endpoint["path"] == "/metrics", name
        monitored |= rendered.selected(service["spec"]["selector"])
    assert monitored == set(rendered.workloads()) - {"redis"}


def test_the_alert_rules_are_the_compose_stacks(rendered: Rendered) -> None:
    (rule,) = rendered.of_kind("PrometheusRule")
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"] == alerts, "copy deploy/prometheus/alerts.yml into base/monitoring.yaml"


def test_probes_hit_routes_the_servers_serve(rendered: Rendered) -> None:
    upstream = {"replicas": ["http://127.0.0.1:9"]}
    variant = VariantSettings(name="probe", backend="openai", upstream=upstream)
    schema = create_app(Settings(auth="off", variants=[variant])).openapi()
    routes = {path for path, operations in schema["paths"].items() if "get" in operations}
    expected = {"readinessProbe": "/ready", "livenessProbe": "/health", "startupProbe": "/health"}
    for name, workload in rendered.workloads().items():
        for container in containers(workload):
            http = {kind: container.get(kind, {}).get("httpGet") for kind in expected}
            probes = {kind: probe for kind, probe in http.items() if probe is not None}
            for kind, probe in probes.items():
                assert probe["port"] in port_names(workload), (name, kind)
                if image_name(container) in OUR_IMAGES:
                    assert probe["path"] in routes, (name, kind)
                    assert probe["path"] == expected[kind], (name, kind)
                else:
                    assert image_name(container) == VLLM_IMAGE, name
                    assert probe["path"] == "/health", (name, kind)  # vLLM's
            if serves(container) or image_name(container) == VLLM_IMAGE:
                assert {"readinessProbe", "livenessProbe"} <= set(probes), name


def test_the_configs_pass_startup_validation(rendered: Rendered, tmp_path: Path) -> None:
    settings = {(name, c["name"]): s for name, c, s in configured(rendered, tmp_path)}
    assert set(settings) == {
        ("gateway", "gateway"),
        ("worker-ct2", "worker"),
        ("worker-ct2", "prepare-model"),  # which loads the settings too
    }
    for (name, container_name), each in settings.items():
        assert each.all_experiments()
        assert each.workers == 1, "one server process per pod: each has its own /metrics"
        workload = rendered.workloads()[name]
        (container,) = [c for c in containers(workload) if c["name"] == container_name]
        if serves(container):
            assert each.port in {p["containerPort"] for p in container["ports"]}, name
    gateway = settings["gateway", "gateway"]
    assert gateway.auth == "required"
    assert gateway.keys == []
    assert gateway.admin_token is None, "the shipped Secret must open nothing"
    assert gateway.redis_url is not None
    services = {s["metadata"]["name"] for s in rendered.of_kind("Service")}
    assert urlsplit(gateway.redis_url).hostname in services


def test_workers_serve_the_model_their_init_container_prepares(
    rendered: Rendered, tmp_path: Path
) -> None:
    """`prepare-model` builds the default model into its model_dir, on a volume that the
    worker mounts where its variants look for the model."""
    workload = rendered.workloads()["worker-ct2"]
    settings = {
        c["name"]: s for name, c, s in configured(rendered, tmp_path) if name == "worker-ct2"
    }
    prepared = settings["prepare-model"].model_dir / DEFAULT_MODEL_NAME
    volumes = {
        c["name"]: {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        for c in containers(workload)
    }
    assert volumes["prepare-model"][str(prepared.parent)] == volumes["worker"][str(prepared.parent)]
    local = [v for v in settings["worker"].all_variants() if v.backend == "ctranslate2"]
    assert local
    for variant in local:
        assert variant.model_path == prepared, variant.name


def test_gateway_upstreams_are_headless_services_serving_the_model(
    rendered: Rendered, tmp_path: Path
) -> None:
    """Each replica URL names a headless Service (each pod's address becomes a replica)
    whose pods serve the model the variant asks for; a forwarded priority meets a vLLM
    started with its priority scheduler."""
    served: dict[str, set[str]] = {}
    for name, _, settings in configured(rendered, tmp_path):
        served.setdefault(name, set()).update(e.name for e in settings.all_experiments())
    for name, workload in rendered.workloads().items():
        if image_name(main_container(workload)) == VLLM_IMAGE:
            served[name] = {flags(main_container(workload))["served-model-name"]}
    variants = [v for v in gateway_settings(rendered, tmp_path).all_variants() if v.upstream]
    assert variants
    for variant in variants:
        assert variant.upstream is not None
        for url in variant.upstream.replicas:
            parts = urlsplit(url)
            service = rendered.named("Service", str(parts.hostname))
            assert service["spec"].get("clusterIP") == "None", f"{parts.hostname}: not headless"
            assert parts.port in {p["port"] for p in service["spec"]["ports"]}, url
            (backing,) = rendered.selected(service["spec"]["selector"])
            assert variant.upstream.model in served[backing], (variant.name, backing)
            if variant.upstream.forward_priority:
                vllm = main_container(rendered.workloads()[backing])
                assert flags(vllm)["scheduling-policy"] == "priority", variant.name


def test_gpus_requested_equal_the_tensor_parallel_size(rendered: Rendered) -> None:
    with_gpus = []
    for name, workload in rendered.workloads().items():
        for container in containers(workload):
            resources = container.get("resources", {})
            gpus = {resources.get(k, {}).get("nvidia.com/gpu") for k in ("requests", "limits")}
            tensor_parallel = flags(container).get("tensor-parallel-size")
            assert gpus == {tensor_parallel}, (name, container["name"])
            if tensor_parallel is not None:
                with_gpus.append(name)
    assert with_gpus == (["vllm"] if rendered.overlay.startswith("gpu") else [])


def test_nothing_runs_as_root(rendered: Rendered) -> None:
    for name, workload in rendered.workloads().items():
        pod = pod_spec(workload).get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, name
        assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, name
        for container in containers(workload):
            where = (name, container["name"])
            own = container.get("securityContext", {})
            user = own.get("runAsUser", pod.get("runAsUser"))
            assert user not in (None, 0), where
            assert own.get("allowPrivilegeEscalation") is False, where
            assert own.get("capabilities") == {"drop": ["ALL"]}, where
            if image_name(container) in OUR_IMAGES:
                assert user == 10001, where  # the image's user
                assert own.get("readOnlyRootFilesystem") is True, where
            assert "memory" in container["resources"]["limits"], where


def test_a_stopping_pod_outlasts_its_drain_and_the_gateways_memory_of_it(
    rendered: Rendered, tmp_path: Path
) -> None:
    """A pod's grace period outlasts its preStop sleep, drain and shutdown timeout. A pod
    the gateways reach keeps taking requests (preStop sleep, then drain) until none sends
    any more: a gateway's next resolution of the Service's name, plus a DNS answer's life."""
    resolve_s: dict[str, float] = {}
    for variant in gateway_settings(rendered, tmp_path).all_variants():
        for url in variant.upstream.replicas if variant.upstream else []:
            host = str(urlsplit(url).hostname)
            resolve_s[host] = max(resolve_s.get(host, 0), variant.upstream.resolve_interval_s)
    drain = {
        name: (settings.drain_s, settings.shutdown_timeout_s)
        for name, container, settings in configured(rendered, tmp_path)
        if serves(container)
    }
    assert set(drain) == {"gateway", "worker-ct2"}
    for name, workload in rendered.workloads().items():
        sleep_s = prestop_sleep_s(main_container(workload))
        drain_s, shutdown_s = drain.get(name, (0.0, 0.0))
        grace_s = pod_spec(workload).get("terminationGracePeriodSeconds", 30)
        assert grace_s > sleep_s + drain_s + shutdown_s, name
        for host, interval_s in resolve_s.items():
            if name in rendered.selected(rendered.named("Service", host)["spec"]["selector"]):
                assert sleep_s + drain_s >= interval_s + DNS_TTL_S, (name, host)


def test_each_deployment_has_one_autoscaler_which_owns_its_count(rendered: Rendered) -> None:
    """One kind of autoscaler per overlay (HPA or KEDA, never both on a Deployment); no
    replica count in the Deployment to fight it; gateways and workers keep two pods."""
    scaled: dict[str, str] = {}
    for scaler in rendered.of_kind("HorizontalPodAutoscaler") + rendered.of_kind("ScaledObject"):
        spec = scaler["spec"]
        target = spec["scaleTargetRef"]["name"]
        assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        assert target not in scaled, f"{target}: two autoscalers"
        scaled[target] = scaler["kind"]
        minimum = spec.get("minReplicas", spec.get("minReplicaCount"))
        assert minimum >= (1 if target == "vllm" else 2), target
    assert len(set(scaled.values())) == 1, scaled
    deployments = {d["metadata"]["name"]: d for d in rendered.of_kind("Deployment")}
    assert set(scaled) == set(deployments)
    for name, deployment in deployments.items():
        assert "replicas" not in deployment["spec"], f"{name}: the autoscaler owns the count"


def test_autoscalers_and_alerts_read_series_the_servers_export(rendered: Rendered) -> None:
    """HPAs name custom metrics that prometheus-adapter makes of series the app (or vLLM)
    exports; KEDA's queries name such series, and select the namespace and the job that the
    scaled pods' ServiceMonitor gives them; so do the alert rules."""
    exported = exported_series()
    adapter = adapter_metrics()
    for series in adapter.values():
        assert series in exported or series.startswith("vllm:"), series
    for hpa in rendered.of_kind("HorizontalPodAutoscaler"):
        for metric in hpa["spec"]["metrics"]:
            assert metric["type"] == "Pods", hpa["metadata"]["name"]
            assert metric["pods"]["metric"]["name"] in adapter, hpa["metadata"]["name"]
    for scaled in rendered.of_kind("ScaledObject"):
        target = scaled["spec"]["scaleTargetRef"]["name"]
        for trigger in scaled["spec"]["triggers"]:
            assert trigger["type"] == "prometheus", target
            query = trigger["metadata"]["query"]
            assert metric_names(query), query
            for series in metric_names(query):
                assert series in exported or series.startswith("vllm:"), query
            assert matchers(query)["namespace"] == scaled["metadata"]["namespace"], query
            assert matchers(query)["job"] in monitor_jobs(rendered, target), query
    for rule in rendered.of_kind("PrometheusRule"):
        for group in rule["spec"]["groups"]:
            for alert in group["rules"]:
                assert metric_names(alert["expr"]) <= exported, alert["alert"]


@pytest.mark.parametrize("stack", ["cpu", "gpu"])
def test_hpa_and_keda_aim_at_the_same_targets(stack: str) -> None:
    def aims(rendered: Rendered) -> dict[str, tuple[int, int, float]]:
        found = {}
        for hpa in rendered.of_kind("HorizontalPodAutoscaler"):
            spec = hpa["spec"]
            (metric,) = spec["metrics"]
            target = float(metric["pods"]["target"]["averageValue"])
            found[spec["scaleTargetRef"]["name"]] = (
                spec["minReplicas"],
                spec["maxReplicas"],
                target,
            )
        for scaled in rendered.of_kind("ScaledObject"):
            spec = scaled["spec"]
            (trigger,) = spec["triggers"]
            target = float(trigger["metadata"]["threshold"])
            found[spec["scaleTargetRef"]["name"]] = (
                spec["minReplicaCount"],
                spec["maxReplicaCount"],
                target,
            )
        return found

    assert aims(render(stack)) == aims(render(f"{stack}-keda"))
