"""tests/k8s: one real control plane for the session (cluster.py) and a kubelet stand-in per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.k8s.cluster import K8sCluster, k8s_api, k8s_cluster, k8s_namespace, kubeconfig  # noqa: F401
from tests.k8s.kubelet_standin import KubeletStandIn


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/k8s/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.k8s)


@pytest.fixture
def kubelet(k8s_cluster: K8sCluster, k8s_namespace: str) -> Iterator[KubeletStandIn]:  # noqa: F811
    standin = KubeletStandIn(k8s_cluster.api, k8s_namespace)
    try:
        yield standin
    finally:
        standin.release()
