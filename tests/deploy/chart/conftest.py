"""tests/deploy/chart: the real control plane's fixtures (tests/k8s/cluster.py) for test_install_k8s.py."""

from tests.k8s.cluster import k8s_cluster, k8s_namespace, kubeconfig  # noqa: F401
