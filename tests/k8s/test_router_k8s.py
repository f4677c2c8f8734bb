"""The router process with `--discovery kubernetes`, as the chart runs it: its own ServiceAccount
bound to a Role with only `pods: get, list, watch`, and its readiness following the worker pods."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from kubernetes import client, config

from services.common.netutil import free_port
from tests.k8s.cluster import K8sCluster
from tests.k8s.kubelet_standin import KubeletStandIn
from tests.k8s.test_k8s_discovery import BOUND, SELECTOR, worker_deployment
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


def router_kubeconfig(cluster: K8sCluster, ns: str, path: Path) -> Path:
    """A kubeconfig for ServiceAccount `router` of `ns`, allowed pods get/list/watch there and nothing else."""
    core, rbac = cluster.core(), client.RbacAuthorizationV1Api(cluster.api)
    core.create_namespaced_service_account(
        ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="router"))
    )
    rule = client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["get", "list", "watch"])
    rbac.create_namespaced_role(ns, client.V1Role(metadata=client.V1ObjectMeta(name="router"), rules=[rule]))
    rbac.create_namespaced_role_binding(
        ns,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="router"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="router"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="router", namespace=ns)],
        ),
    )
    req = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
    )
    token = core.create_namespaced_service_account_token("router", ns, req).status.token
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f'clusters:\n- name: c\n  cluster: {{server: "{cluster.server}", certificate-authority: {cluster.dir}/pki/ca.crt}}\n'
        f"users:\n- name: router\n  user: {{token: {token}}}\n"
        f"contexts:\n- name: c\n  context: {{cluster: c, user: router, namespace: {ns}}}\ncurrent-context: c\n"
    )
    return path


def test_the_router_needs_only_pod_reads(k8s_cluster: K8sCluster, k8s_namespace: str, tmp_path: Path) -> None:
    kc = router_kubeconfig(k8s_cluster, k8s_namespace, tmp_path / "router.kubeconfig")
    as_router = client.CoreV1Api(config.new_client_from_config(config_file=str(kc)))
    assert as_router.list_namespaced_pod(k8s_namespace).items == []
    for forbidden in (
        lambda: as_router.list_namespaced_secret(k8s_namespace),
        lambda: as_router.list_namespaced_pod("default"),
        lambda: as_router.delete_collection_namespaced_pod(k8s_namespace),
    ):
        with pytest.raises(client.ApiException) as e:
            forbidden()
        assert e.value.status == 403


@pytest.fixture
def router(k8s_cluster: K8sCluster, k8s_namespace: str, tmp_path: Path) -> Iterator[str]:
    kc = router_kubeconfig(k8s_cluster, k8s_namespace, tmp_path / "router.kubeconfig")
    port = free_port()
    log = (tmp_path / "router.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.router.main", "--port", str(port), "--model", "smollm2",
         "--discovery", "kubernetes", "--k8s-namespace", k8s_namespace, "--k8s-kubeconfig", str(kc),
         "--k8s-label-selector", SELECTOR, "--log-level", "warning"],
        cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _status(f"{base}/health") == 200, 60), (tmp_path / "router.log").read_text()
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        assert "Forbidden" not in (tmp_path / "router.log").read_text()  # pods get/list/watch sufficed


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def test_router_readiness_follows_the_worker_pods(
    k8s_cluster: K8sCluster, k8s_namespace: str, kubelet: KubeletStandIn, router: str
) -> None:
    r = httpx.get(f"{router}/ready", timeout=5)
    assert (r.status_code, r.json()["reason"]) == (503, "no_prefill_worker")
    apps = k8s_cluster.apps()
    for d in (worker_deployment("prefill", "prefill", bucket="short"), worker_deployment("decode", "decode")):
        apps.create_namespaced_deployment(k8s_namespace, d)
    started = kubelet.start_pending(SELECTOR, count=2)
    assert wait_for(lambda: _status(f"{router}/ready") == 200, BOUND)
    body = httpx.get(f"{router}/ready", timeout=5).json()
    assert (body["prefill_workers"], body["decode_workers"]) == (1, 1)

    decode = next(n for n in started if n.startswith("decode"))
    kubelet.set_ready(decode, False)
    assert wait_for(lambda: _status(f"{router}/ready") == 503, BOUND)
    assert httpx.get(f"{router}/ready", timeout=5).json()["reason"] == "no_decode_worker"
    assert _status(f"{router}/health") == 200  # liveness stays
    kubelet.terminate(decode)  # and a replacement decode pod comes up elsewhere
    kubelet.finish(decode)
    kubelet.start_pending("app.kubernetes.io/component=decode", count=1)
    assert wait_for(lambda: _status(f"{router}/ready") == 200, BOUND)
