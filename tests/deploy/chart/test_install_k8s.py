"""helm install / upgrade / uninstall of helm/swaserve into a real kube-apiserver 1.20 (+ etcd +
kube-controller-manager: tests/k8s/cluster.py) with helm-python-sdk. The controllers turn the
Deployments into ReplicaSets and pods; there is no kubelet, so pods stay Pending, and what is checked
is what a kubelet would be handed: commands, env, probes, resources, labels."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import helm_python as helm
import pytest
from kubernetes import client

from tests.deploy.chart.chart_render import CHART
from tests.k8s.cluster import K8sCluster

pytestmark = pytest.mark.k8s
T = TypeVar("T")
RELEASE = "sw"

VALUES: dict[str, Any] = {
    "image": {"repository": "registry.example/swaserve", "tag": "t1"},
    "router": {"replicas": 2, "hpa": {"enabled": False}},
    "prefill": {
        "defaults": {
            "engine": {"maxTotalTokens": 65536},
            "resources": {"requests": {"cpu": "2", "memory": "4Gi"}},
        },
        "pools": [
            {"name": "short", "minTokens": 0, "maxTokens": 4096, "replicas": 2},
            {
                "name": "long",
                "minTokens": 4096,
                "maxTokens": 131072,
                "engine": {"chunkSize": 2048},
                "gpus": 1,
            },
        ],
    },
    "decode": {"engine": {"maxTotalTokens": 140000}},
}


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def cfg(k8s_cluster: K8sCluster, k8s_namespace: str) -> Iterator[helm.Config]:
    with helm.Config(kubeconfig_path=str(k8s_cluster.kubeconfig), namespace=k8s_namespace) as c:
        yield c


def pods(core: client.CoreV1Api, ns: str, selector: str) -> list[client.V1Pod]:
    return [
        p
        for p in core.list_namespaced_pod(ns, label_selector=selector).items
        if not p.metadata.deletion_timestamp
    ]


def get_raw(cluster: K8sCluster, path: str) -> dict[str, Any]:
    """GET an object of an API version the current client library no longer has a class for."""
    api = cluster.api
    method, url, headers, body, _ = api.param_serialize("GET", path, auth_settings=["BearerToken"])
    resp = api.call_api(method, url, header_params=headers, body=body)
    resp.read()
    obj: dict[str, Any] = json.loads(resp.data)
    return obj


def flag_map(args: list[str]) -> dict[str, str]:
    return {a.partition("=")[0]: a.partition("=")[2] for a in args if a.startswith("--")}


def test_install_upgrade_uninstall(cfg: helm.Config, k8s_cluster: K8sCluster, k8s_namespace: str) -> None:
    ns, core, apps = k8s_namespace, k8s_cluster.core(), k8s_cluster.apps()
    t0 = time.monotonic()
    release = cfg.install(str(CHART), RELEASE, VALUES, namespace=ns)
    installed_s = time.monotonic() - t0
    assert release["status"] == "deployed", release
    assert "prefill pools: short (0, 4096] long (4096, 131072]" in release["notes"]
    # Kubernetes 1.20 has neither policy/v1 nor autoscaling/v2: the chart asked the API server
    manifest = release["manifest"]
    assert "apiVersion: policy/v1beta1\nkind: PodDisruptionBudget" in manifest
    pdb = get_raw(
        k8s_cluster, f"/apis/policy/v1beta1/namespaces/{ns}/poddisruptionbudgets/sw-swaserve-router"
    )
    assert pdb["spec"]["minAvailable"] == 1

    # the controllers create the pods: 2 routers, 2 + 1 prefill, 1 decode, 1 redis
    sel = f"app.kubernetes.io/instance={RELEASE}"
    expected = {"router": 2, "prefill": 3, "decode": 1, "redis": 1}

    def counts() -> dict[str, int] | None:
        c: dict[str, int] = {}
        for p in pods(core, ns, sel):
            role = p.metadata.labels["app.kubernetes.io/component"]
            c[role] = c.get(role, 0) + 1
        return c if c == expected else None

    wait_for(f"pods {expected}", counts)
    short = pods(core, ns, "app.kubernetes.io/component=prefill,swaserve.io/bucket=short")
    long = pods(core, ns, "app.kubernetes.io/component=prefill,swaserve.io/bucket=long")
    assert len(short) == 2 and len(long) == 1
    lp = long[0]
    assert (lp.metadata.labels["swaserve.io/min-tokens"], lp.metadata.labels["swaserve.io/max-tokens"]) == (
        "4096",
        "131072",
    )
    assert lp.metadata.annotations["swaserve.io/grpc-port"] == "7000"
    c = lp.spec.containers[0]
    assert c.image == "registry.example/swaserve:t1" and c.command is None
    f = flag_map(c.args)
    assert c.args[0] == "prefill"
    assert (f["--bucket"], f["--chunk-size"], f["--max-total-tokens"]) == ("long", "2048", "65536")
    assert f["--redis-url"] == "$(REDIS_URL)" and f["--advertise-host"] == "$(POD_IP)"
    env = {e.name: e for e in c.env}
    assert env["POD_IP"].value_from.field_ref.field_path == "status.podIP"
    assert env["REDIS_PASSWORD"].value_from.secret_key_ref.name == "sw-swaserve-redis"
    assert env["SWASERVE_WORKER_ID"].value == "$(POD_NAME)"
    assert c.resources.limits == {"nvidia.com/gpu": "1"}  # the API server copies a GPU limit into requests
    assert c.resources.requests == {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"}
    assert (c.startup_probe.http_get.path, c.startup_probe.http_get.port) == ("/health", "metrics")
    assert (c.readiness_probe.http_get.path, c.readiness_probe.http_get.port) == ("/ready", "metrics")
    assert (
        flag_map(c.args)["--metrics-port"] == "9090"
        and {p.name: p.container_port for p in c.ports}["metrics"] == 9090
    )
    assert lp.spec.init_containers[0].args[:2] == ["model", "init"]
    assert lp.spec.security_context.run_as_user == 10001

    router = pods(core, ns, "app.kubernetes.io/component=router")[0]
    rc = router.spec.containers[0]
    assert rc.args[0] == "router" and flag_map(rc.args)["--length-buckets"] == "short:4096,long:131072"
    rf = flag_map(rc.args)
    assert (rf["--discovery"], rf["--k8s-namespace"]) == ("kubernetes", "$(POD_NAMESPACE)")
    assert (
        rf["--k8s-label-selector"] == f"app.kubernetes.io/name=swaserve,app.kubernetes.io/instance={RELEASE}"
    )
    assert rc.readiness_probe.http_get.path == "/ready" and rc.liveness_probe.http_get.path == "/health"
    assert router.spec.service_account_name == "sw-swaserve-router"
    rbac = client.RbacAuthorizationV1Api(k8s_cluster.api)
    rule = rbac.read_namespaced_role("sw-swaserve-router", ns).rules[0]
    assert (rule.resources, sorted(rule.verbs)) == (["pods"], ["get", "list", "watch"])
    decode = pods(core, ns, "app.kubernetes.io/component=decode")[0].spec.containers[0]
    assert decode.args[0] == "decode" and flag_map(decode.args)["--max-total-tokens"] == "140000"
    secret = core.read_namespaced_secret("sw-swaserve-redis", ns).data["redis-password"]
    assert len(base64.b64decode(secret)) == 32
    token = core.read_namespaced_secret("sw-swaserve-internal-token", ns).data["token"]
    assert len(base64.b64decode(token)) == 48  # security.internalToken: generated
    assert {e.name: e for e in rc.env}["SWASERVE_INTERNAL_TOKEN"].value_from.secret_key_ref.name == (
        "sw-swaserve-internal-token"
    )
    assert "--api-keys-redis" in rc.args  # security.apiKeys: on, in Redis

    # upgrade: a third pool, the long pool's range moves, two decode workers, the HPA on
    up = {**VALUES, "router": {"replicas": 2}, "decode": {**VALUES["decode"], "replicas": 2}, "prefill": {**VALUES["prefill"], "pools": [
        *VALUES["prefill"]["pools"][:1],
        {"name": "long", "minTokens": 4096, "maxTokens": 65536},
        {"name": "huge", "minTokens": 65536, "maxTokens": 262144},
    ]}}  # fmt: skip
    assert cfg.upgrade(str(CHART), RELEASE, up, namespace=ns)["revision"] == 2
    wait_for("the huge pool's pod", lambda: pods(core, ns, "swaserve.io/bucket=huge"))
    wait_for("2 decode pods", lambda: len(pods(core, ns, "app.kubernetes.io/component=decode")) == 2)
    wait_for(
        "the long pool relabelled",
        lambda: any(
            p.metadata.labels["swaserve.io/max-tokens"] == "65536"
            for p in pods(core, ns, "swaserve.io/bucket=long")
        ),
    )
    hpa_path = f"/apis/autoscaling/v2beta2/namespaces/{ns}/horizontalpodautoscalers/sw-swaserve-router"
    assert get_raw(k8s_cluster, hpa_path)["spec"]["minReplicas"] == 2
    assert core.read_namespaced_secret("sw-swaserve-redis", ns).data["redis-password"] == secret  # kept
    assert core.read_namespaced_secret("sw-swaserve-internal-token", ns).data["token"] == token  # kept
    # a bad upgrade is refused before anything changes
    bad = {
        **up,
        "prefill": {
            "pools": [
                {"name": "a", "minTokens": 0, "maxTokens": 10},
                {"name": "b", "minTokens": 20, "maxTokens": 30},
            ]
        },
    }
    with pytest.raises(helm.HelmError, match="leaves a gap"):
        cfg.upgrade(str(CHART), RELEASE, bad, namespace=ns)
    assert [d.metadata.name for d in apps.list_namespaced_deployment(ns).items if "prefill" in d.metadata.name] == [
        "sw-swaserve-prefill-huge", "sw-swaserve-prefill-long", "sw-swaserve-prefill-short"
    ]  # fmt: skip

    cfg.uninstall(RELEASE)
    wait_for("deployments gone", lambda: not apps.list_namespaced_deployment(ns).items or None)
    wait_for("pods gone", lambda: not pods(core, ns, sel) or None, timeout=60)
    assert not apps.list_namespaced_stateful_set(ns).items
    print(f"install took {installed_s:.2f}s")
