"""The control plane fixture and the kubelet stand-in, against the real API server."""

from __future__ import annotations

from kubernetes import client

from tests.k8s.cluster import K8sCluster
from tests.k8s.kubelet_standin import KubeletStandIn
from tests.waiting import wait_for


def _deployment(name: str, replicas: int) -> client.V1Deployment:
    labels = {"app": name}
    container = client.V1Container(name="c", image="swaserve:test", command=["swaserve", "router"])
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels), spec=client.V1PodSpec(containers=[container])
            ),
        ),
    )


def test_controllers_make_pods_that_stay_pending(k8s_cluster: K8sCluster, k8s_namespace: str) -> None:
    k8s_cluster.apps().create_namespaced_deployment(k8s_namespace, _deployment("web", 2))
    standin = KubeletStandIn(k8s_cluster.api, k8s_namespace)
    pods = standin.wait_pods("app=web", 2)
    assert {p.status.phase for p in pods} == {"Pending"}
    assert pods[0].spec.containers[0].command == ["swaserve", "router"]
    assert k8s_cluster.kubeconfig.is_file()


def test_standin_moves_a_pod_through_its_life(k8s_cluster: K8sCluster, kubelet: KubeletStandIn) -> None:
    core = k8s_cluster.core()
    ns = kubelet.namespace
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="p", labels={"app": "p"}),
        spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="x")]),
    )
    core.create_namespaced_pod(ns, pod)
    ip = kubelet.start("p", ready=False)
    got = core.read_namespaced_pod("p", ns)
    assert (got.status.phase, got.status.pod_ip) == ("Running", ip)
    assert {c.type: c.status for c in got.status.conditions}["Ready"] == "False"
    kubelet.set_ready("p", True)
    assert {c.type: c.status for c in core.read_namespaced_pod("p", ns).status.conditions}["Ready"] == "True"
    kubelet.terminate("p")
    held = core.read_namespaced_pod("p", ns)  # still there, terminating
    assert held.metadata.deletion_timestamp is not None
    kubelet.finish("p")
    assert wait_for(lambda: not core.list_namespaced_pod(ns, field_selector="metadata.name=p").items, 10)
