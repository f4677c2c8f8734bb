"""helm install, then an OpenAI request answered end to end: the chart installed into the real
kube-apiserver (tests/k8s/cluster.py), the controllers make the pods, and the process kubelet
stand-in (tests/k8s/process_kubelet.py) runs each pod's init containers and containers as local
processes on the pod's own loopback IP. The built-in tiny model is written by the pods' init
containers; Redis is a real redis-server the test starts (the chart's external Redis URL), since
Services do not route here. The router finds the workers by watching pods with its own service
account's token; the request goes to a router pod's IP with the official `openai` client and an API
key the test adds to Redis (the chart's default key store), and every internal call carries the
token of the Secret the chart generated. Then the
decode pod is deleted and its replacement (a new IP) answers the next request; the uninstall
leaves no process behind."""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import openai
import pytest
from kubernetes import client

from services.common.api_keys import RedisKeyStore
from services.common.redis_server import RedisServer
from tests.deploy.chart.chart_render import CHART
from tests.k8s.cluster import K8sCluster
from tests.k8s.process_kubelet import ProcessKubeletStandIn

pytestmark = pytest.mark.k8s
RELEASE = "e2e"
ONE_THREAD = [{"name": "OMP_NUM_THREADS", "value": "1"}]
ENGINE = {"maxTotalTokens": 4096, "maxRunning": 4, "torchThreads": 1}


def values(redis_url: str) -> dict[str, object]:
    return {
        "image": {"repository": "swaserve"},
        "models": {"source": "builtin", "name": "mimo-tiny"},
        "router": {"replicas": 2, "hpa": {"enabled": False}, "extraEnv": ONE_THREAD},
        "prefill": {
            "defaults": {"engine": ENGINE, "extraEnv": ONE_THREAD},
            "pools": [{"name": "all", "minTokens": 0, "maxTokens": 4096}],
        },
        "decode": {"engine": ENGINE, "extraEnv": ONE_THREAD},
        "redis": {"enabled": False, "external": {"url": redis_url}},
    }


@pytest.fixture
def redis_url() -> Iterator[str]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make setup installs Debian's)")
    with RedisServer() as r:
        yield r.url


@pytest.fixture
def kubelet(k8s_cluster: K8sCluster, k8s_namespace: str, tmp_path: Path) -> Iterator[ProcessKubeletStandIn]:
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed: the pods' init containers cannot build the tiny model")
    standin = ProcessKubeletStandIn(k8s_cluster.api, k8s_namespace, tmp_path / "pods").start()
    try:
        yield standin
    finally:
        standin.stop()


def live_pods(core: client.CoreV1Api, ns: str) -> list[dict[str, Any]]:
    """The namespace's pods that are not being deleted, as the API's JSON."""
    pods: list[dict[str, Any]] = core.api_client.sanitize_for_serialization(
        core.list_namespaced_pod(ns).items
    )
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def is_ready(pod: dict[str, Any]) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def wait_ready(
    core: client.CoreV1Api, ns: str, kubelet: ProcessKubeletStandIn, count: int, timeout: float
) -> list[dict[str, Any]]:
    """All `count` live pods of the namespace Ready; fails at once on an error or exit of the stand-in."""
    deadline = time.monotonic() + timeout
    while True:
        pods = live_pods(core, ns)
        ready = [p for p in pods if is_ready(p)]
        if len(ready) == count == len(pods):
            return ready
        if kubelet.errors or kubelet.exits or time.monotonic() > deadline:
            names = sorted(p["metadata"]["name"] for p in ready)
            raise AssertionError(
                f"{len(ready)}/{len(pods)} pods Ready {names}; errors {kubelet.errors}; exits {kubelet.exits}\n"
                + kubelet.logs()
            )
        time.sleep(0.5)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][:1] != "Z"


def ask(base: str, key: str) -> None:
    """One chat completion through the router at `base`; a real answer with usage."""
    api = openai.OpenAI(base_url=f"{base}/v1", api_key=key, timeout=120, max_retries=0)
    resp = api.chat.completions.create(
        model="mimo-tiny", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert resp.model == "mimo-tiny"
    assert isinstance(resp.choices[0].message.content, str)
    assert resp.choices[0].finish_reason in ("length", "stop")
    assert resp.usage is not None and resp.usage.prompt_tokens > 0
    # max_tokens=8: "length" means exactly 8 tokens were generated, "stop" fewer (an end token)
    if resp.choices[0].finish_reason == "length":
        assert resp.usage.completion_tokens == 8
    else:
        assert 0 < resp.usage.completion_tokens < 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_helm_install_answers_openai_request(
    k8s_cluster: K8sCluster, k8s_namespace: str, redis_url: str, kubelet: ProcessKubeletStandIn
) -> None:
    ns, core = k8s_namespace, k8s_cluster.core()
    t0 = time.monotonic()
    with helm.Config(kubeconfig_path=str(k8s_cluster.kubeconfig), namespace=ns) as cfg:
        release = cfg.install(str(CHART), RELEASE, values(redis_url), namespace=ns)
        key, _ = RedisKeyStore(redis_url).add("e2e")  # security.apiKeys: on, in Redis
        assert release["status"] == "deployed"
        pods = wait_ready(core, ns, kubelet, count=4, timeout=240)  # 2 routers, 1 prefill, 1 decode
        ready_s = time.monotonic() - t0
        routers = [p for p in pods if p["metadata"]["labels"]["app.kubernetes.io/component"] == "router"]
        ips = {p["status"]["podIP"] for p in pods}
        assert len(ips) == 4 and all(ip.startswith("127.") for ip in ips)

        base = f"http://{routers[0]['status']['podIP']}:8000"
        with urllib.request.urlopen(f"{base}/ready", timeout=5) as r:  # noqa: S310 - loopback
            assert r.status == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="sk-swa-none", max_retries=0).models.list()
        t1 = time.monotonic()
        ask(base, key)
        request_s = time.monotonic() - t1

        # the decode pod is deleted: the stand-in stops its process, the ReplicaSet makes a new pod
        # on a new IP, and the router (its watch) routes the next request there
        (old,) = [p for p in pods if p["metadata"]["labels"]["app.kubernetes.io/component"] == "decode"]
        (old_run,) = [r for r in kubelet.runs.values() if r.name == old["metadata"]["name"]]
        old_pid = old_run.procs["decode"].pid
        t2 = time.monotonic()
        core.delete_namespaced_pod(old["metadata"]["name"], ns)
        pods = wait_ready(core, ns, kubelet, count=4, timeout=120)
        (new,) = [p for p in pods if p["metadata"]["labels"]["app.kubernetes.io/component"] == "decode"]
        assert new["status"]["podIP"] != old["status"]["podIP"] and not alive(old_pid)
        ask(base, key)
        restart_s = time.monotonic() - t2

        pids = kubelet.pids()
        assert len(pids) == 4 and all(alive(p) for p in pids)
        cfg.uninstall(RELEASE)
    deadline = time.monotonic() + 60
    while left := core.list_namespaced_pod(ns).items:
        assert time.monotonic() < deadline, f"{len(left)} pods left 60 s after the uninstall"
        time.sleep(0.2)
    assert not [p for p in pids if alive(p)] and not kubelet.pids()
    assert not kubelet.errors and not kubelet.exits, (kubelet.errors, kubelet.exits)
    print(
        f"ready {ready_s:.1f}s after install; one request {request_s:.2f}s; decode replaced and answering"
        f" {restart_s:.1f}s after its delete; all processes gone"
    )
