"""The router's Kubernetes discovery (services/router/k8s_*.py) against the real API server.

Worker pods come from real Deployments (the controllers make them); the kubelet stand-in moves them
through Running / Ready / terminating; every change must reach the router's worker set within BOUND.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
from kubernetes import client

from services.common.redis_server import RedisServer
from services.common.registry import WorkerRecord, WorkerRegistry
from services.router.discovery import RedisWorkerPool
from services.router.k8s_discovery import KubernetesWorkerPool
from services.router.k8s_pods import PodWatcher
from tests.k8s.cluster import K8sCluster
from tests.k8s.kubelet_standin import KubeletStandIn
from tests.k8s.tcp_proxy import CuttableProxy
from tests.waiting import wait_for

BOUND = 2.0  # seconds within which the worker set must follow a pod change
SELECTOR = "app.kubernetes.io/name=swaserve"
GRPC_PORT = 50051


def worker_deployment(name: str, role: str, replicas: int = 1, bucket: str = "") -> client.V1Deployment:
    selector = {"app.kubernetes.io/name": "swaserve", "app.kubernetes.io/component": role, "pool": name}
    labels = selector | ({"swaserve.io/bucket": bucket} if bucket else {})
    container = client.V1Container(
        name=role,
        image="swaserve:test",
        command=["swaserve", role],
        ports=[client.V1ContainerPort(name="grpc", container_port=GRPC_PORT)],
    )
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels=selector),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(
                    labels=labels, annotations={"swaserve.io/grpc-port": str(GRPC_PORT)}
                ),
                spec=client.V1PodSpec(containers=[container]),
            ),
        ),
    )


def deploy(cluster: K8sCluster, ns: str, *deployments: client.V1Deployment) -> None:
    for d in deployments:
        cluster.apps().create_namespaced_deployment(ns, d)


def addrs(pool: KubernetesWorkerPool, role: str) -> set[str]:
    workers = pool.prefill_workers() if role == "prefill" else pool.decode_workers()
    return {w.addr for w in workers}


def follows(pool: KubernetesWorkerPool, role: str, want: set[str]) -> bool:
    return wait_for(lambda: addrs(pool, role) == want, BOUND, 0.02)


@pytest.fixture
def make_pool(k8s_cluster: K8sCluster, k8s_namespace: str) -> Iterator[object]:
    pools: list[KubernetesWorkerPool] = []

    def make(
        api: client.ApiClient | None = None, resync_s: float = 30.0, loads: object = None
    ) -> KubernetesWorkerPool:
        core = client.CoreV1Api(api or k8s_cluster.new_api_client())
        watcher = PodWatcher(core, k8s_namespace, SELECTOR, resync_s=resync_s).start()
        pool = KubernetesWorkerPool(watcher, "m", loads=loads)
        pools.append(pool)
        assert watcher.wait_synced(10)
        return pool

    yield make
    for p in pools:
        p.close()


def test_pods_become_workers_only_when_ready(
    k8s_cluster: K8sCluster, k8s_namespace: str, kubelet: KubeletStandIn, make_pool
) -> None:
    deploy(
        k8s_cluster, k8s_namespace,
        worker_deployment("prefill-short", "prefill", 2, bucket="short"), worker_deployment("decode", "decode"),
    )  # fmt: skip
    pool = make_pool()
    pods = kubelet.wait_pods(SELECTOR, 3)
    assert addrs(pool, "prefill") == addrs(pool, "decode") == set() and not pool.ready()
    ips = {p.metadata.name: kubelet.start(p.metadata.name, ready=False) for p in pods}  # Running, not Ready
    assert not wait_for(lambda: addrs(pool, "prefill"), 0.5)  # nothing routable while not Ready
    for name in ips:
        kubelet.set_ready(name, True)
    prefill = {f"{ip}:{GRPC_PORT}" for n, ip in ips.items() if n.startswith("prefill")}
    assert follows(pool, "prefill", prefill)
    assert follows(pool, "decode", {f"{ip}:{GRPC_PORT}" for n, ip in ips.items() if n.startswith("decode")})
    assert pool.ready()
    recs = pool.routable_records("prefill")
    assert {r.labels["bucket"] for r in recs} == {"short"}
    assert all(r.labels["load"] == "unknown" for r in recs)  # no Redis: routable by address only
    assert {c.has_load for c in pool.candidates("prefill")} == {False}


def test_ready_flip_termination_deletion_and_restart(
    k8s_cluster: K8sCluster, k8s_namespace: str, kubelet: KubeletStandIn, make_pool
) -> None:
    deploy(
        k8s_cluster,
        k8s_namespace,
        worker_deployment("prefill", "prefill", 2),
        worker_deployment("decode", "decode"),
    )
    pool = make_pool()
    started = kubelet.start_pending(SELECTOR, count=3)
    assert len(started) == 3
    p1, p2 = sorted(n for n in started if n.startswith("prefill"))
    a1, a2 = f"{started[p1]}:{GRPC_PORT}", f"{started[p2]}:{GRPC_PORT}"
    assert follows(pool, "prefill", {a1, a2})

    kubelet.set_ready(p1, False)  # readiness probe fails
    assert follows(pool, "prefill", {a2})
    kubelet.set_ready(p1, True)
    assert follows(pool, "prefill", {a1, a2})

    kubelet.terminate(p1)  # terminating: still listed, with a deletionTimestamp, still "Ready"
    assert follows(pool, "prefill", {a2})
    assert k8s_cluster.core().read_namespaced_pod(p1, k8s_namespace).metadata.deletion_timestamp is not None
    kubelet.finish(p1)  # gone; the ReplicaSet makes a replacement, which restarts with a new IP
    new = [
        p.metadata.name
        for p in kubelet.wait_pods("app.kubernetes.io/component=prefill", 2)
        if p.metadata.name != p2
    ]
    assert len(new) == 1 and new[0] != p1
    assert addrs(pool, "prefill") == {a2}  # Pending: not routable
    a3 = f"{kubelet.start(new[0])}:{GRPC_PORT}"
    assert a3 not in (a1, a2)
    assert follows(pool, "prefill", {a2, a3})

    kubelet.finish(p2)  # no finalizer left: a delete removes the pod at once (DELETED)
    k8s_cluster.core().delete_namespaced_pod(p2, k8s_namespace, grace_period_seconds=0)
    assert follows(pool, "prefill", {a3})

    kubelet.set_phase(new[0], "Failed")  # its containers exited for good
    assert follows(pool, "prefill", set())
    assert not pool.ready()


def test_same_pod_name_back_with_a_new_ip(
    k8s_cluster: K8sCluster, k8s_namespace: str, kubelet: KubeletStandIn, make_pool
) -> None:
    """A StatefulSet-like restart: the pod is deleted and made again under its name, elsewhere."""
    core = k8s_cluster.core()
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(
            name="decode-0",
            labels={"app.kubernetes.io/name": "swaserve", "app.kubernetes.io/component": "decode"},
            annotations={"swaserve.io/grpc-port": "7000"},
        ),
        spec=client.V1PodSpec(containers=[client.V1Container(name="d", image="swaserve:test")]),
    )
    core.create_namespaced_pod(k8s_namespace, copy.deepcopy(pod))
    pool = make_pool()
    kubelet.start("decode-0", ip="10.9.0.1")
    assert follows(pool, "decode", {"10.9.0.1:7000"})
    kubelet.terminate("decode-0")
    kubelet.finish("decode-0")
    core.create_namespaced_pod(k8s_namespace, copy.deepcopy(pod))
    assert follows(pool, "decode", set())
    kubelet.start("decode-0", ip="10.9.0.2")
    assert follows(pool, "decode", {"10.9.0.2:7000"})


def test_a_cut_watch_is_reconnected_and_what_changed_meanwhile_is_seen(
    k8s_cluster: K8sCluster, k8s_namespace: str, kubelet: KubeletStandIn, make_pool
) -> None:
    proxy = CuttableProxy(k8s_cluster.port)
    try:
        deploy(
            k8s_cluster,
            k8s_namespace,
            worker_deployment("prefill", "prefill", 2),
            worker_deployment("decode", "decode"),
        )
        pool = make_pool(api=k8s_cluster.new_api_client(f"https://127.0.0.1:{proxy.port}"))
        started = kubelet.start_pending(SELECTOR, count=3)
        p1, p2 = sorted(n for n in started if n.startswith("prefill"))
        a1, a2 = f"{started[p1]}:{GRPC_PORT}", f"{started[p2]}:{GRPC_PORT}"
        assert follows(pool, "prefill", {a1, a2})

        # a plain cut: the watcher reconnects, and a change right after is followed
        lists = pool.watcher.lists
        assert proxy.cut() > 0
        kubelet.set_ready(p1, False)
        assert follows(pool, "prefill", {a2})
        assert wait_for(lambda: pool.watcher.lists > lists, BOUND)  # it re-listed on reconnect

        # an outage: changes made while no connection can be made are seen once it can
        proxy.block()
        kubelet.set_ready(p1, True)
        kubelet.set_ready(p2, False)
        assert wait_for(lambda: pool.watcher.errors > 0, BOUND)
        assert addrs(pool, "prefill") == {a2}  # the last known set stays while the API is away
        proxy.unblock()
        assert follows(pool, "prefill", {a1})
        assert pool.watcher.api_ok
    finally:
        proxy.close()


def test_periodic_relist(k8s_cluster: K8sCluster, k8s_namespace: str, make_pool) -> None:
    pool = make_pool(resync_s=1.0)
    first = pool.watcher.lists
    assert wait_for(lambda: pool.watcher.lists >= first + 2, 5.0)


@pytest.fixture
def redis_url(tmp_path) -> Iterator[str]:
    server = RedisServer(log_path=tmp_path / "redis.log").start()
    try:
        yield server.url
    finally:
        server.stop()


def test_redis_gives_loads_and_kubernetes_decides_who_is_routable(
    k8s_cluster: K8sCluster, k8s_namespace: str, kubelet: KubeletStandIn, make_pool, redis_url: str
) -> None:
    deploy(
        k8s_cluster,
        k8s_namespace,
        worker_deployment("prefill", "prefill", 2),
        worker_deployment("decode", "decode"),
    )
    started = kubelet.start_pending(SELECTOR, count=3)
    p1, p2 = sorted(n for n in started if n.startswith("prefill"))
    a1, a2 = f"{started[p1]}:{GRPC_PORT}", f"{started[p2]}:{GRPC_PORT}"
    w1, ghost = WorkerRegistry(redis_url, ttl=30), WorkerRegistry(redis_url, ttl=30)
    w1.register(
        WorkerRecord("prefill", a1, "m", 4096, worker_id="w1"), lambda: {"waiting": 3, "queued_tokens": 700}
    )
    ghost.register(WorkerRecord("prefill", "10.99.0.1:1", "m", 4096, worker_id="ghost"))  # a record, no pod
    loads = RedisWorkerPool(redis_url, model="m", refresh_s=0.1)
    assert {r.worker_id for r in loads.records("prefill")} == {"w1", "ghost"}
    pool = make_pool(loads=loads)
    assert follows(pool, "prefill", {a1, a2})
    recs = {r.addr: r for r in pool.routable_records("prefill")}
    assert (recs[a1].worker_id, recs[a1].waiting, recs[a1].queued_tokens) == ("w1", 3, 700)
    assert recs[a2].labels.get("load") == "unknown" and recs[a2].worker_id == a2
    cands = {c.addr: c for c in pool.candidates("prefill")}
    assert cands[a1].has_load and not cands[a2].has_load

    kubelet.set_ready(p1, False)  # its Redis record still heartbeats, but the pod is not Ready
    assert follows(pool, "prefill", {a2})
    assert [r.worker_id for r in loads.records("prefill") if r.addr == a1] == ["w1"]
    w1.deregister()
    ghost.deregister()
